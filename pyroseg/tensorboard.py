"""TensorBoard logging of a training run, fed by the rows ``metrics.csv`` gets.

An optional extra (``pip install 'pyroseg[tensorboard]'``): nothing else in
pyroseg imports this module, and :func:`require_tensorboard` turns a missing
``tensorboard`` package into a one-line usage error saying how to install it.

:class:`TensorBoardCallbacks` is a :class:`pyroseg.train.FitCallbacks` (what
``fit(callbacks=...)`` takes; the run's ``CallbackHandler`` calls it at each
hook, after best.pt, checkpoint.pt and metrics.csv are written): after
every epoch it writes each number of that epoch's row as a scalar, at the
epoch as the step, under a tag grouped by the column's prefix::

    train_loss, train_time_s      -> train/loss, train/time_s
    val_loss, val_recon           -> val/loss, val/recon        (the plain ELBO's terms, beta = 1)
    val_kl_<site>, val_au_<site>  -> val/kl_<site>, val/au_<site>   (KL and active units per latent site)
    val_dice_all, val_dice_tumour -> val/dice_all, val/dice_tumour
    val_time_s                    -> val/time_s
    geco_lambda, geco_c_ma, ...   -> geco/lambda, geco/c_ma, ...
    beta, nonfinite_steps         -> schedule/beta, train/nonfinite_steps

and, once the run has drawn them, its pictures (``val_samples.png``: the
validation sample grid; ``latent_scales.png``, ``curves.png``) as images.
Open it with ``tensorboard --logdir RUN/tensorboard``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pyroseg.errors import UsageError

__all__ = ["TensorBoardCallbacks", "require_tensorboard", "scalar_tag", "INSTALL_HINT"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pyroseg[tensorboard]'"

#: Columns that are positions, not measurements (``epoch`` is the step).
_SKIP = {"epoch", "step"}
_RENAMED = {"beta": "schedule/beta", "nonfinite_steps": "train/nonfinite_steps"}
_PICTURES = ("val_samples.png", "latent_scales.png", "curves.png")


def require_tensorboard(option: str = "--tensorboard") -> None:
    """Raise a :class:`UsageError` naming ``option`` and the install command when
    the ``tensorboard`` package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError(f"{option}: needs the tensorboard package, an optional extra; install it with {INSTALL_HINT}") from None


def scalar_tag(column: str) -> str | None:
    """The TensorBoard tag of a ``metrics.csv`` column (``None``: not logged)."""
    if column in _SKIP:
        return None
    if column in _RENAMED:
        return _RENAMED[column]
    for prefix in ("train", "val", "geco"):
        if column.startswith(prefix + "_"):
            return f"{prefix}/{column[len(prefix) + 1:]}"
    return f"other/{column}"


class TensorBoardCallbacks:
    """Per-epoch scalars and the run's pictures in TensorBoard event files under ``log_dir``.

    ``config``: a :class:`~pyroseg.config.FitConfig` whose options are written
    once as text (the ``config`` tab), so that runs can be told apart.
    """

    def __init__(self, log_dir: str | Path, *, config: Any = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.last_epoch = 0
        if config is not None:
            lines = [f"    {k}: {v}" for k, v in config.to_dict().items()]  # indented: markdown keeps it as is
            self.writer.add_text("config", "\n".join(lines), 0)

    # -- FitCallbacks -----------------------------------------------------------------
    def on_load_progress(self, done: int, total: int) -> None: ...

    def on_data(self, summary: dict) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None: ...

    def on_step(self, loss: float) -> None: ...

    def on_epoch_end(self, row: dict) -> None:
        epoch = int(row["epoch"])
        for column, value in row.items():
            tag = scalar_tag(column)
            if tag is None or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            self.writer.add_scalar(tag, float(value), epoch)
        self.writer.flush()
        self.last_epoch = epoch

    # -- after fit -----------------------------------------------------------------------
    def add_run_pictures(self, run: str | Path) -> list[str]:
        """Add the run's PNGs (validation samples, latent scales, curves) as images at
        the last epoch; returns the tags written."""
        import numpy as np
        from PIL import Image

        written = []
        for name in _PICTURES:
            png = Path(run) / name
            if not png.is_file():
                continue
            with Image.open(png) as im:
                img = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
            tag = "pictures/" + name.removesuffix(".png")
            self.writer.add_image(tag, img, self.last_epoch, dataformats="HWC")
            written.append(tag)
        self.writer.flush()
        return written

    def close(self) -> None:
        self.writer.close()
