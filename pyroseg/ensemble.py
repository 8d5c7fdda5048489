"""``pyroseg ensemble``: join trained runs into one run folder, a deep ensemble.

    pyroseg fit --model unet --data D --seed 0 --init-seed 1 --out runs/u1
    pyroseg fit --model unet --data D --seed 0 --init-seed 2 --out runs/u2
    ...
    pyroseg ensemble runs/u1 runs/u2 ... --out runs/unet_x5
    pyroseg evaluate runs/unet_x5

The members are ordinary runs: trained one by one (or at once, on several machines),
resumed, evaluated each on its own. ``--init-seed`` changes their weights, shuffle and
noise and keeps the data and the split of ``--seed``, so that they share one test set.
The joined folder holds ``config.json`` (model ``"ensemble"``, the members' names and
hyper-parameters, the first member's ``fit`` section for the data and split, and the
member folders under ``"ensemble"``), the shared ``split.json`` and one
``checkpoint.pt`` with every member's weights (:class:`~pyroseg.models.ensemble.EnsembleModel`).
It does not depend on the member folders afterwards.

Refused, with one line naming the run: fewer than two runs, a run that is not a
finished pyroseg run, runs of other data, image size or split (a member trained on
another split has seen the ensemble's test patients).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from pyroseg.checkpoint import save_checkpoint
from pyroseg.errors import UsageError
from pyroseg.models import EnsembleModel
from pyroseg.runs import CHECKPOINT, CONFIG, SPLIT, load_run, prepare_run_dir, write_json

__all__ = ["join_runs"]

#: ``fit`` settings every member must share: they fix the data and the split.
_SHARED = ("data", "image_size", "seed", "val_fraction", "test_fraction", "synthetic_patients", "synthetic_slices",
           "folds", "fold")


def join_runs(runs: list[str | Path], out: str | Path, *, overwrite: bool = False) -> dict:
    """Join ``runs`` into the run folder ``out``; returns its ``config.json`` document."""
    if len(runs) < 2:
        raise UsageError(f"RUNS: expected at least 2 run folders to join, got {len(runs)}")
    if len({Path(r).resolve() for r in runs}) != len(runs):
        raise UsageError("RUNS: a run folder is given twice")
    loaded = [load_run(r) for r in runs]
    first = loaded[0]
    for run in loaded[1:]:
        for k in _SHARED:
            mine, theirs = getattr(run.config, k), getattr(first.config, k)
            if mine != theirs:
                raise UsageError(f"{run.run_dir}: {k} {mine!r} differs from {first.run_dir}'s {theirs!r}; "
                                 "members must share data, image size and split (vary --init-seed)")
        if run.split != first.split:
            raise UsageError(f"{run.run_dir}: its split.json differs from {first.run_dir}'s; members must share the split")
        if run.model.in_channels != first.model.in_channels:
            raise UsageError(f"{run.run_dir}: {run.model.in_channels} input channels, {first.run_dir}: {first.model.in_channels}")
    out = prepare_run_dir(out, overwrite=overwrite)
    members = [{"name": r.model.name, "hparams": r.model.hparams()} for r in loaded]
    model = EnsembleModel(members=members, image_size=first.model.image_size, in_channels=first.model.in_channels,
                          widths=first.model.widths)
    for dst, run in zip(model.members, loaded, strict=True):
        dst.load_state_dict(run.model.state_dict())
    doc = copy.deepcopy(first.doc)
    doc["model"] = {"name": model.name, "hparams": model.hparams(), "num_params": model.num_params,
                    "latent_sites": [], "latent_units": {}, "sample_from": model.sample_from}
    doc["ensemble"] = {"members": [str(r.run_dir) for r in loaded],
                       "init_seeds": [r.config.train_seed for r in loaded],
                       "epochs": [r.epochs_done for r in loaded]}
    hparams = json.loads(json.dumps(model.hparams()))
    save_checkpoint(out / CHECKPOINT, {"model_name": model.name, "hparams": hparams, "model_state": model.state_dict(),
                                       "epoch": min(r.epochs_done for r in loaded)})
    write_json(out / SPLIT, first.split)
    write_json(out / CONFIG, doc)  # last: a folder with config.json is a complete run
    return doc
