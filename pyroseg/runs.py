"""The run folder: what ``pyroseg fit`` writes and ``evaluate`` / ``sample`` read.

    RUN_DIR/
      config.json     the FitConfig, model hyper-parameters, parameter count,
                      data summary and package versions (JSON)
      split.json      the patients of train / val / test, with the seed
      metrics.csv     one row per epoch (train loss, validation ELBO terms,
                      KL per latent site, beta, validation Dice, timings)
      checkpoint.pt   weights, optimizer, epoch/step, RNG states, history
      best.pt         the weights of the epoch with the best validation score
                      (``--select-by``); what evaluate / sample use by default
      curves.png      training curves; val_samples.png a grid of validation samples;
                      latent_scales.png what each latent site controls (models with several)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyroseg.checkpoint import atomic_write_text, load_checkpoint
from pyroseg.config import CONFIG_VERSION, FitConfig, load_config_json
from pyroseg.data import load_source
from pyroseg.data.core import SegData
from pyroseg.errors import CheckpointError, UsageError
from pyroseg.models import MODELS, SegModel, build_model

__all__ = [
    "CONFIG",
    "SPLIT",
    "METRICS",
    "CHECKPOINT",
    "BEST",
    "CHECKPOINTS",
    "pick_checkpoint",
    "RUN_FILES",
    "prepare_run_dir",
    "clear_run_files",
    "stray_temp_files",
    "check_checkpoint",
    "load_weights",
    "read_run_files",
    "write_json",
    "write_metrics_csv",
    "read_metrics_csv",
    "load_run",
    "read_run",
    "RunFiles",
    "LoadedRun",
    "check_split",
    "at_least_one",
    "select_split",
    "EVAL_SPLITS",
]

CONFIG = "config.json"
SPLIT = "split.json"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
#: Written at the finish of fit: steps trained, why training stopped, the validation curve.
TRAINING = "training.json"
#: The patient groups a command can be asked for (``--split``); ``all``: every slice.
EVAL_SPLITS = ("test", "val", "train", "all")
RUN_FILES = (CONFIG, SPLIT, METRICS, CHECKPOINT, BEST, TRAINING, "curves.png", "val_samples.png", "latent_scales.png")

#: Fields of a FitConfig that may differ between a run's config.json and its
#: checkpoint (``--resume`` may raise ``epochs``; the rest do not change results;
#: ``num_workers`` is a retired field that older checkpoints still hold).
_FREE_FIELDS = {"out", "epochs", "device", "cache_dir", "num_workers", "source_config"}

log = logging.getLogger(__name__)


def stray_temp_files(out: str | Path) -> list[Path]:
    """Temporary files that a killed :func:`~pyroseg.checkpoint.atomic_write` of a
    run file left in ``out`` (``.checkpoint.pt.<random>.tmp`` and the like)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp") if p.is_file())


def prepare_run_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make sure ``out`` can hold a new run (or holds one to resume).

    A folder that already holds a run is refused unless ``resume`` or
    ``overwrite``. Nothing of an existing run is removed here (``overwrite``
    removes its files later, with :func:`clear_run_files`, once the new run's
    data and model are known to be good); only the temporary files of a killed
    write (:func:`stray_temp_files`) are deleted.

    ``resume`` accepts a folder with a ``config.json`` but no checkpoint yet
    (a run killed during its first epoch): :func:`pyroseg.train.fit` then starts
    it from the beginning with its saved config.
    """
    out = Path(out)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite: give one or the other")
    has_run = (out / CONFIG).exists() or (out / CHECKPOINT).exists()
    if resume:
        if not out.is_dir():
            raise UsageError(f"--resume {out}: no such run folder")
        if not (out / CHECKPOINT).exists() and ((out / METRICS).exists() or not (out / CONFIG).exists()):
            raise UsageError(f"--resume {out}: no checkpoint.pt there to resume from")
    elif has_run and not overwrite:
        raise UsageError(f"--out {out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".pyroseg-write-test.{os.getpid()}"  # one per process: the ranks of a job probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        flag = "--resume" if resume else "--out"
        raise UsageError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    for tmp in stray_temp_files(out):
        log.warning("removing %s, left by a write that was interrupted", tmp)
        tmp.unlink(missing_ok=True)
    return out


def clear_run_files(out: str | Path) -> None:
    """Remove the files a run writes (:data:`RUN_FILES`), nothing else of the user's."""
    for name in RUN_FILES:
        (Path(out) / name).unlink(missing_ok=True)


def write_json(path: str | Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def write_metrics_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write every epoch's row (the whole history, atomically: an epoch appears once)."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no metrics.csv here; is this a pyroseg run folder?")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        conv = {}
        for k, v in r.items():
            try:
                conv[k] = float(v) if v not in ("", None) else float("nan")
            except ValueError:
                conv[k] = v
        out.append(conv)
    return out


#: The values of ``--checkpoint`` of evaluate / sample.
CHECKPOINTS = ("best", "last")


def pick_checkpoint(run_dir: str | Path, which: str | None = None) -> tuple[Path, str]:
    """The weights file of a run and a line saying which it is.

    ``which``: ``"best"`` (``best.pt``; refused when the run has none), ``"last"``
    (``checkpoint.pt``) or ``None``: best.pt when the run has one, else
    checkpoint.pt (a run from before best.pt existed, or without validation
    patients).
    """
    run_dir = Path(run_dir)
    if which not in (None, *CHECKPOINTS):
        raise UsageError(f"--checkpoint {which!r}: expected best or last")
    best = run_dir / BEST
    if which == "best" and not best.is_file():
        raise UsageError(f"--checkpoint best: {run_dir} has no {BEST} (no validation patients, or written before "
                         "best.pt existed); use --checkpoint last")
    if which == "best" or (which is None and best.is_file()):
        return best, "best"
    reason = "" if which == "last" else f"; the run has no {BEST}"
    return run_dir / CHECKPOINT, f"last{reason}"


def _describe(path: Path, kind: str, ckpt: dict) -> str:
    """``best.pt (epoch 7, val_dice_tumour 0.7123)`` or ``checkpoint.pt (last, epoch 10)``."""
    epoch = ckpt.get("epoch", "?")
    sel = ckpt.get("best") if kind == "best" else None
    if isinstance(sel, dict) and "metric" in sel:
        return f"{path.name} (best by {sel['metric']} {float(sel['value']):.4g}, epoch {epoch})"
    return f"{path.name} ({kind}, epoch {epoch})"


def check_split(which: str) -> str:
    """``which`` if it names a patient group (:data:`EVAL_SPLITS`), else a one-line :class:`UsageError`."""
    if which not in EVAL_SPLITS:
        raise UsageError(f"--split {which!r}: expected one of {', '.join(EVAL_SPLITS)}")
    return which


def at_least_one(option: str, value: int) -> int:
    """``value`` if it is at least 1 (``--num-samples``, ``--seeds``, ...), else a one-line
    :class:`UsageError` naming ``option``."""
    if value < 1:
        raise UsageError(f"{option} {value}: expected at least 1")
    return value


class RunFiles:
    """A run folder's config and patient split, without its weights: enough to load its data."""

    def __init__(self, run_dir: Path, doc: dict, split: dict):
        self.run_dir = run_dir
        self.doc = doc
        self.config = FitConfig.from_dict(doc["fit"])
        self.split = split

    def load_data(self, split: str = "all", *, data: str | None = None, cache_dir: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> SegData:
        """The slices of the run's data whose patients are in its ``split`` (``test``, ``val``,
        ``train``; ``all``: every slice), at the run's image size and with its source options.

        ``data``: another source in the same layout instead of the run's own; ``cache_dir``:
        instead of the run's; ``progress(done, total)``: as :func:`pyroseg.data.load_source`."""
        check_split(split)
        cfg = self.config
        spec = data or cfg.data
        dataset = load_source(spec, cfg.image_size, **{**cfg.source_options(), "cache_dir": cache_dir or cfg.cache_dir},
                              progress=progress)
        return self.select(dataset, split, source=spec)

    def select(self, dataset: SegData, split: str, *, source: str | None = None) -> SegData:
        """The slices of ``dataset`` whose patients are in the run's ``split`` (:func:`select_split`)."""
        return select_split(dataset, self.split, split, source=source or self.config.data)


class LoadedRun(RunFiles):
    """A run folder opened for evaluation or sampling: config, split, model with weights.
    ``checkpoint_file``: the weights' file; ``checkpoint_used``: a line naming it (for the user)."""

    def __init__(self, run_dir: Path, doc: dict, split: dict, model: SegModel, checkpoint: dict,
                 checkpoint_file: Path | None = None, checkpoint_used: str = CHECKPOINT):
        super().__init__(run_dir, doc, split)
        self.model = model
        self.checkpoint = checkpoint
        self.checkpoint_file = checkpoint_file or run_dir / CHECKPOINT
        self.checkpoint_used = checkpoint_used

    @property
    def epochs_done(self) -> int:
        return int(self.checkpoint.get("epoch", 0))


def read_run_files(run_dir: str | Path) -> tuple[dict, dict]:
    """The JSON config document and the JSON split of a run folder (no weights)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir}: not a folder")
    doc = load_config_json(run_dir / CONFIG)
    if doc.get("config_version", 0) > CONFIG_VERSION:  # load_config_json already refuses; kept explicit
        raise CheckpointError(f"{run_dir / CONFIG}: newer config version")
    split_path = run_dir / SPLIT
    try:
        split = json.loads(split_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{split_path}: missing; the run folder is incomplete") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{split_path}: unreadable ({e})") from None
    return doc, split


def read_run(run_dir: str | Path) -> RunFiles:
    """Open a run folder without its weights: its config and split (:meth:`RunFiles.load_data`)."""
    run_dir = Path(run_dir)
    return RunFiles(run_dir, *read_run_files(run_dir))


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu", checkpoint: str | None = None) -> LoadedRun:
    """Open a run folder: JSON config, JSON split and the weights (safely) of
    ``checkpoint`` (see :func:`pick_checkpoint`: by default best.pt when there is one)."""
    run_dir = Path(run_dir)
    doc, split = read_run_files(run_dir)
    path, kind = pick_checkpoint(run_dir, checkpoint)
    ckpt = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(ckpt, doc, source=path).to(device)
    model.eval()
    used = _describe(path, kind.split(";")[0], ckpt) + (kind[kind.index(";"):] if ";" in kind else "")
    log.info("%s: using %s", run_dir, used)
    return LoadedRun(run_dir, doc, split, model, ckpt, path, used)


def _jsonable(x: Any) -> Any:
    """Tuples as lists, so a value from a checkpoint compares equal to its JSON twin."""
    return json.loads(json.dumps(x, default=str))


def check_checkpoint(ckpt: dict, doc: dict, *, source: Path) -> None:
    """Refuse a checkpoint that is not the one of the run described by ``doc``
    (its config.json), naming every difference: the model, each hyper-parameter
    (image size, widths, latent sizes, ...), and the run's settings (data,
    seed, ...) where the checkpoint records them."""
    diffs = []
    name = doc["model"]["name"]
    if ckpt.get("model_name") != name:
        diffs.append(f"model {ckpt.get('model_name')!r} (config.json: {name!r})")
    mine, theirs = _jsonable(ckpt.get("hparams", {})), _jsonable(doc["model"]["hparams"])
    keys = set(mine) | set(theirs) if not diffs else set(mine) & set(theirs)  # another model: shared ones only
    for k in sorted(keys):
        if mine.get(k) != theirs.get(k):
            diffs.append(f"{k} {mine.get(k, 'unset')} (config.json: {theirs.get(k, 'unset')})")
    if isinstance(ckpt.get("config"), dict):
        mine, theirs = _jsonable(ckpt["config"]), _jsonable(doc["fit"])
        # fields only one side has come from another pyroseg version: not a difference
        for k in sorted((set(mine) & set(theirs)) - _FREE_FIELDS - {"model", "image_size", "widths", "model_args"}):
            if mine[k] != theirs[k]:
                diffs.append(f"{k} {mine[k]!r} (config.json: {theirs[k]!r})")
    if diffs:
        raise CheckpointError(f"{source}: refused: not the checkpoint of this run; it has " + ", ".join(diffs))


def load_weights(model: SegModel, ckpt: dict, *, source: Path) -> None:
    """``model.load_state_dict`` with a one-line error naming ``source``."""
    try:
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source}: weights do not fit model {model.name!r} ({first})") from None


def model_from_checkpoint(ckpt: dict, doc: dict, *, source: Path) -> SegModel:
    """Rebuild the model named in the config and load the checkpoint's weights,
    refusing a checkpoint of another model, image size or run (:func:`check_checkpoint`)."""
    check_checkpoint(ckpt, doc, source=source)
    # a model from outside pyroseg is opened by the import path its run recorded
    ref = doc["model"].get("import_path") or doc["model"]["name"]
    try:
        model = build_model(ref, **doc["model"]["hparams"])
    except UsageError as e:
        if ref in MODELS:
            raise
        raise CheckpointError(f"{source.parent / CONFIG}: cannot open its model {ref!r}: "
                              f"{str(e).split(': ', 1)[-1]}") from None
    load_weights(model, ckpt, source=source)
    return model


def select_split(data: SegData, split: dict, which: str, *, source: str) -> SegData:
    """The slices of ``data`` whose patients are in ``split[which]`` (``"all"``: every slice)."""
    if which == "all":
        return data
    if which not in split:
        raise UsageError(f"--split {which!r}: expected one of {', '.join(EVAL_SPLITS)}")
    present = [p for p in split[which] if p in set(data.patient_ids)]
    if not present:
        raise UsageError(
            f"--split {which}: none of the run's {len(split[which])} {which} patients are in {source}; "
            "use --split all to evaluate on every patient there"
        )
    return data.subset(present)
