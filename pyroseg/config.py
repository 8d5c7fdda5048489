"""The configuration of a training run, and the versions written beside it.

A :class:`FitConfig` is all ``pyroseg fit`` needs; its JSON form
(``config.json`` in the run folder) rebuilds the model and the data exactly.
Configs are only ever read as JSON: opening a run never executes code.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroseg.errors import CheckpointError, UsageError

__all__ = ["FitConfig", "CONFIG_VERSION", "AUGMENTS", "LR_SCHEDULES", "SELECT_BY", "versions", "load_config_json"]

#: The values of ``--augment``, ``--lr-schedule`` and ``--select-by`` (checked here,
#: implemented in :mod:`pyroseg.augment`, :mod:`pyroseg.schedules` and :mod:`pyroseg.train`).
AUGMENTS = ("none", "flip", "standard")
LR_SCHEDULES = ("constant", "cosine", "step")
SELECT_BY = ("auto", "val_dice_tumour", "val_dice_all", "val_loss", "val_ged")

#: What a config.json written before a field existed meant by its absence: that
#: version's behaviour, which may differ from today's default.
#: Fields older configs have that no longer exist, dropped on reading: ``num_workers``
#: never reached the DataLoader (the data is in memory, and the random annotator of each
#: slice is drawn from the main process's RNG, which crash-exact resume restores).
_RETIRED = ("num_workers",)
_LEGACY = {"augment": "none", "lr_schedule": "constant", "lr_warmup": 0.0, "select_by": "auto", "patience": None}

#: Bumped when the meaning of a config field changes; a run written by a newer
#: version is refused rather than misread.
CONFIG_VERSION = 1


@dataclass
class FitConfig:
    """Everything one training run depends on (``pyroseg fit`` options)."""

    model: str = "unet"
    data: str = "synthetic"  # "synthetic", "synthetic-ambiguous", an LGG or QUBIQ folder, or a LIDC pickle
    out: str = "runs/unet"
    image_size: int = 64
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    device: str = "auto"
    seed: int = 0
    # split by patient
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # objective
    elbo: str = "meanfield"  # "meanfield" (analytic KL) or "trace" (Monte Carlo KL)
    beta: float = 1.0
    beta_warmup: float | None = None  # None: a quarter of the epochs (resolved by validate())
    beta_cycle: float = 0.0
    clip_norm: float | None = None
    max_nonfinite: int = 20
    # "elbo" (beta-weighted ELBO) or "geco" (constrained reconstruction, pyroseg.geco)
    objective: str = "elbo"
    geco_kappa: float | None = None  # topk: nats per selected pixel, None: 0.05; mean: nats per pixel, None: auto (pyroseg.geco)
    geco_alpha: float = 0.99
    geco_rate: float | None = None  # None: 1e-2 (softplus, DeepMind) or 1.0 (multiplicative), resolved by validate()
    geco_warmup: float | None = None  # epochs of fixed lambda; None: 0 (softplus) or a tenth of the epochs (multiplicative)
    geco_max_step: float = 0.01  # bound on |Delta log lambda| per step
    free_bits: float = 0.0  # nats per latent site (batch mean), 0: off
    # evaluation during training
    val_samples: int = 4
    collapse_diagnostics: bool = True  # active units and effect of each latent site, every epoch
    # model hyper-parameters beyond the shared backbone (latent sizes, ...)
    model_args: dict = field(default_factory=dict)
    widths: tuple[int, ...] = (16, 32, 64, 128)
    # data source options
    synthetic_patients: int = 20
    synthetic_slices: int = 16
    cache_dir: str | None = None
    # speed: channels-last weights and activations (measured 1.2-1.27x faster steps on CPU)
    channels_last: bool = True
    # training recipe (docs/guide/training-recipe.md)
    augment: str = "none"  # training batches only: "none", "flip" or "standard" (pyroseg.augment)
    lr_schedule: str = "constant"  # "constant", "cosine" or "step" (pyroseg.schedules.lr_at)
    lr_warmup: float = 0.0  # epochs of linear learning-rate warm-up from 0 to --lr
    select_by: str = "auto"  # validation column that picks best.pt; auto: val_dice_tumour (one annotator) or val_ged (several)
    patience: int | None = None  # stop after this many epochs without a better select_by; None: never
    # multi-rater sources (issue 12): the QUBIQ task (None: the only one there) and the axis
    # a 3-D NIfTI volume is sliced along (-1: the last); the intensity scaling used is
    # recorded in config.json's "data" section
    task: str | None = None
    slice_axis: int = -1
    # deep ensembles (issue 15): seed of the weights, the shuffle and the sampling noise; None: --seed.
    # The data and the split always come from --seed, so members that differ only here share them.
    init_seed: int | None = None

    # provenance: the config.json this run was trained again from (``fit --config``); None: from options
    source_config: str | None = None
    # seed of the data (the synthetic generator) and of the patient split; None: `seed`.
    # `pyroseg compare --seeds` holds it fixed so that the seeds vary only weights, z noise and order.
    data_seed: int | None = None
    # the per-epoch collapse diagnostics look at this many evenly spaced validation slices (0: all);
    # on all of them they took longer than hprob_unet's training epoch (docs/guide/comparing.md)
    collapse_slices: int = 32
    # speed on a GPU: training arrays resident on the device, batches gathered there
    # (pyroseg.data.device); auto: on a CUDA device when they take < 1/4 of its free memory
    data_on_device: str = "auto"

    # GECO as in DeepMind's HPU-Net code (issue 13): the constraint on a stochastic top-k of the
    # pixels ("topk") or on the mean over the image ("mean", before issue 13); the multiplier as
    # softplus(w)^2 by gradient ascent ("softplus") or by lambda *= exp(rate * C) ("multiplicative")
    geco_constraint: str = "topk"
    geco_top_k: float = 0.02  # share of the batch's pixels in the top-k constraint
    geco_deterministic_top_k: bool = False  # the k largest cross-entropies instead of a draw
    geco_update: str = "softplus"

    @property
    def train_seed(self) -> int:
        """The seed of the weights, the shuffle and the noise (``init_seed``, else ``seed``)."""
        return self.seed if self.init_seed is None else self.init_seed

    def validate(self) -> FitConfig:
        """Refuse values that cannot work, naming the option (UsageError, exit 2),
        and resolve defaults that depend on other fields (``beta_warmup``)."""
        if self.beta_warmup is None:
            # GECO balances the terms through lambda: no KL annealing on top by default
            anneal = self.beta_cycle == 0 and self.objective != "geco"
            self.beta_warmup = round(0.25 * self.epochs, 4) if anneal else 0.0
        if self.geco_rate is None:
            self.geco_rate = 1e-2 if self.geco_update == "softplus" else 1.0
        if self.geco_warmup is None:
            self.geco_warmup = 0.0 if self.geco_update == "softplus" else round(0.1 * self.epochs, 4)
        checks = [
            (self.epochs >= 1, f"--epochs {self.epochs}: expected at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: expected at least 1"),
            (self.lr > 0, f"--lr {self.lr}: expected a positive learning rate"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"--device {self.device!r}: expected auto, cpu or cuda"),
            (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
             f"--val-fraction {self.val_fraction} / --test-fraction {self.test_fraction}: expected fractions in [0, 1) summing below 1"),
            (self.elbo in ("meanfield", "trace"), f"--elbo {self.elbo!r}: expected meanfield or trace"),
            (self.beta >= 0, f"--beta {self.beta}: expected >= 0"),
            (self.beta_warmup >= 0, f"--beta-warmup {self.beta_warmup}: expected >= 0 epochs"),
            (self.beta_cycle >= 0, f"--beta-cycle {self.beta_cycle}: expected >= 0 epochs"),
            (self.clip_norm is None or self.clip_norm > 0, f"--clip-norm {self.clip_norm}: expected a positive norm"),
            (self.max_nonfinite >= 1, f"--max-nonfinite {self.max_nonfinite}: expected at least 1"),
            (self.objective in ("elbo", "geco"), f"--objective {self.objective!r}: expected elbo or geco"),
            (self.geco_kappa is None or self.geco_kappa > 0, f"--geco-kappa {self.geco_kappa}: expected a positive number of nats per pixel (or auto)"),
            (self.geco_constraint in ("topk", "mean"), f"--geco-constraint {self.geco_constraint!r}: expected topk or mean"),
            (0 < self.geco_top_k <= 1, f"--geco-top-k {self.geco_top_k}: expected a share of the pixels in (0, 1]"),
            (self.geco_update in ("softplus", "multiplicative"), f"--geco-update {self.geco_update!r}: expected softplus or multiplicative"),
            (0 <= self.geco_alpha < 1, f"--geco-alpha {self.geco_alpha}: expected a decay in [0, 1)"),
            (self.geco_rate > 0, f"--geco-rate {self.geco_rate}: expected a positive rate"),
            (self.geco_warmup >= 0, f"--geco-warmup {self.geco_warmup}: expected >= 0 epochs"),
            (self.geco_max_step > 0, f"--geco-max-step {self.geco_max_step}: expected a positive bound"),
            (self.free_bits >= 0, f"--free-bits {self.free_bits}: expected >= 0 nats"),
            (self.val_samples >= 1, f"--val-samples {self.val_samples}: expected at least 1"),
            (self.augment in AUGMENTS, f"--augment {self.augment!r}: expected one of {', '.join(AUGMENTS)}"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}"),
            (self.lr_warmup >= 0, f"--lr-warmup {self.lr_warmup}: expected >= 0 epochs"),
            (self.select_by in SELECT_BY, f"--select-by {self.select_by!r}: expected one of {', '.join(SELECT_BY)}"),
            (self.patience is None or self.patience >= 1, f"--patience {self.patience}: expected at least 1 epoch"),
            (self.task is None or (isinstance(self.task, str) and self.task.strip() != ""), f"--task {self.task!r}: expected a task name such as task01"),
            (isinstance(self.slice_axis, int) and -3 <= self.slice_axis <= 2, f"--slice-axis {self.slice_axis}: a 3-D volume has axes 0, 1, 2 (or -1, -2, -3)"),
            (self.init_seed is None or (isinstance(self.init_seed, int) and self.init_seed >= 0),
             f"--init-seed {self.init_seed}: expected an integer >= 0"),
            (self.data_seed is None or isinstance(self.data_seed, int), f"data_seed {self.data_seed!r}: expected an integer"),
            (self.collapse_slices >= 0, f"--collapse-slices {self.collapse_slices}: expected >= 0 (0: every slice)"),
            (self.data_on_device in ("auto", "on", "off"), f"--data-on-device {self.data_on_device!r}: expected auto, on or off"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        return self

    def source_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pyroseg.data.load_source` that rebuild this run's data
        (besides ``spec`` and ``image_size``)."""
        return {"seed": self.seed_of_data(), "synthetic_patients": self.synthetic_patients, "synthetic_slices": self.synthetic_slices,
                "cache_dir": self.cache_dir, "task": self.task, "slice_axis": self.slice_axis}

    def seed_of_data(self) -> int:
        """The seed of the data and the patient split: ``data_seed``, or ``seed`` when unset."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in _RETIRED}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"config has unknown fields {unknown}: written by a newer pyroseg?")
        d = {**_LEGACY, **d}
        if d.get("objective") == "geco":  # a GECO run written before issue 13: its rule, not today's default
            d.setdefault("geco_constraint", "mean")
            d.setdefault("geco_update", "multiplicative")
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


def versions() -> dict[str, str]:
    """Versions of everything a result depends on."""
    import numpy
    import PIL
    import pyro
    import torch

    import pyroseg

    return {
        "pyroseg": pyroseg.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cuda": str(torch.version.cuda),
    }


def load_config_json(path: str | Path) -> dict[str, Any]:
    """Read a run's ``config.json`` (JSON only: nothing is executed)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json here; is this a pyroseg run folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("fit"), dict):
        raise CheckpointError(f"{path}: not a pyroseg config (no 'fit' section)")
    ver = doc.get("config_version")
    if not isinstance(ver, int) or ver > CONFIG_VERSION:
        raise CheckpointError(
            f"{path}: config version {ver!r}, this pyroseg reads up to version {CONFIG_VERSION}; upgrade pyroseg"
        )
    model = doc.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("hparams"), dict)):
        raise CheckpointError(f"{path}: not a pyroseg config (no 'model' section with name and hparams)")
    try:
        FitConfig.from_dict(doc["fit"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{path}: unreadable 'fit' section ({e})") from None
    return doc
