"""The run folder: what ``pyroseg fit`` writes and ``evaluate`` / ``sample`` read.

    RUN_DIR/
      config.json     the FitConfig, model hyper-parameters, parameter count,
                      data summary and package versions (JSON)
      split.json      the patients of train / val / test, with the seed
      metrics.csv     one row per epoch (train loss, validation ELBO terms,
                      KL per latent site, beta, validation Dice, timings)
      checkpoint.pt   weights, optimizer, epoch/step, RNG states, history
      curves.png      training curves; val_samples.png a grid of validation samples;
                      latent_scales.png what each latent site controls (models with several)
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from pyroseg.checkpoint import atomic_write_text, load_checkpoint
from pyroseg.config import CONFIG_VERSION, FitConfig, load_config_json
from pyroseg.errors import CheckpointError, UsageError
from pyroseg.models import SegModel, build_model

__all__ = [
    "CONFIG",
    "SPLIT",
    "METRICS",
    "CHECKPOINT",
    "RUN_FILES",
    "prepare_run_dir",
    "write_json",
    "write_metrics_csv",
    "read_metrics_csv",
    "load_run",
    "LoadedRun",
]

CONFIG = "config.json"
SPLIT = "split.json"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CONFIG, SPLIT, METRICS, CHECKPOINT, "curves.png", "val_samples.png", "latent_scales.png")


def prepare_run_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make sure ``out`` can hold a new run (or holds one to resume).

    A folder that already holds a run is refused unless ``resume`` or
    ``overwrite``; ``overwrite`` removes only the files a run writes
    (:data:`RUN_FILES`), nothing else of the user's.
    """
    out = Path(out)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite: give one or the other")
    has_run = (out / CONFIG).exists() or (out / CHECKPOINT).exists()
    if resume:
        if not (out / CHECKPOINT).exists():
            raise UsageError(f"--resume {out}: no checkpoint.pt there to resume from")
        return out
    if has_run and not overwrite:
        raise UsageError(f"--out {out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pyroseg-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return out


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


class LoadedRun:
    """A run folder opened for evaluation or sampling: config, split, model with weights."""

    def __init__(self, run_dir: Path, doc: dict, split: dict, model: SegModel, checkpoint: dict):
        self.run_dir = run_dir
        self.doc = doc
        self.config = FitConfig.from_dict(doc["fit"])
        self.split = split
        self.model = model
        self.checkpoint = checkpoint

    @property
    def epochs_done(self) -> int:
        return int(self.checkpoint.get("epoch", 0))


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu") -> LoadedRun:
    """Open a run folder: JSON config, JSON split and the checkpoint's weights (safely)."""
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
    ckpt = load_checkpoint(run_dir / CHECKPOINT, map_location=device)
    model = model_from_checkpoint(ckpt, doc, source=run_dir / CHECKPOINT).to(device)
    model.eval()
    return LoadedRun(run_dir, doc, split, model, ckpt)


def model_from_checkpoint(ckpt: dict, doc: dict, *, source: Path) -> SegModel:
    """Rebuild the model named in the config and load the checkpoint's weights,
    refusing a checkpoint of another model or another image size."""
    name, hparams = doc["model"]["name"], doc["model"]["hparams"]
    if ckpt.get("model_name") != name:
        raise CheckpointError(f"{source}: checkpoint is of model {ckpt.get('model_name')!r} but config.json says {name!r}")
    ck_size = ckpt.get("hparams", {}).get("image_size")
    if ck_size != hparams.get("image_size"):
        raise CheckpointError(f"{source}: checkpoint was trained at image size {ck_size}, config.json says {hparams.get('image_size')}")
    model = build_model(name, **hparams)
    try:
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{source}: weights do not fit model {name!r} ({first})") from None
    return model
