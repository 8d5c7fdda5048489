"""What one epoch's validation costs against the training epoch, in CPU seconds.

    OMP_NUM_THREADS=1 python benchmarks/validation_cost.py RUN_DIR [--slices 128] [--steps 8]

RUN_DIR: a run of ``pyroseg fit`` (its model, data and split). CPU time
(``time.process_time``), not wall time, so that a machine shared with other jobs
gives the same answer; with ``OMP_NUM_THREADS=1`` it is the single thread's time.
To keep it short the parts are measured on a sample and scaled: ``--steps``
training steps (x steps per epoch), the validation ELBO/Dice pass and the
collapse diagnostics on every slice over ``--slices`` validation slices (x
validation slices), the diagnostics on the fixed subset as they run. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from pyroseg.collapse import collapse_report
from pyroseg.data import SegData, load_source
from pyroseg.predict import predict_dataset
from pyroseg.runs import load_run
from pyroseg.train import Trainer


def _take(data: SegData, idx: np.ndarray) -> SegData:
    return SegData(images=data.images[idx], masks=data.masks[idx], patients=data.patients[idx],
                   slice_numbers=data.slice_numbers[idx], source=data.source, meta=dict(data.meta))


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--slices", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    run = load_run(a.run)
    cfg, model = run.config, run.model
    data = load_source(cfg.data, cfg.image_size, seed=cfg.seed_of_data(), synthetic_patients=cfg.synthetic_patients,
                       synthetic_slices=cfg.synthetic_slices, cache_dir=cfg.cache_dir)
    train, val = data.subset(run.split["train"]), data.subset(run.split["val"])
    bs = max(cfg.batch_size, 32)
    torch.manual_seed(0)
    # training: --steps steps of --batch-size, as fit runs them
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = Trainer(model, lr=cfg.lr, elbo=cfg.elbo, clip_norm=cfg.clip_norm, free_bits=cfg.free_bits)
    model.train()
    images = torch.from_numpy(train.images[: cfg.batch_size]).float() / 255
    masks = torch.from_numpy(train.masks[: cfg.batch_size, :1]).float()
    trainer.step(images, masks)  # warm-up
    step = _cpu(lambda: [trainer.step(images, masks) for _ in range(a.steps)]) / a.steps
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sample = _take(val, np.linspace(0, len(val) - 1, min(a.slices, len(val))).round().astype(int))
    scale = len(val) / len(sample)
    pred = _cpu(lambda: predict_dataset(model, sample, num_samples=cfg.val_samples, batch_size=bs)) * scale
    every = _cpu(lambda: collapse_report(model, sample, num_samples=cfg.val_samples, batch_size=bs)) * scale
    subset = _cpu(lambda: collapse_report(model, val, num_samples=cfg.val_samples, batch_size=bs,
                                          max_slices=cfg.collapse_slices or None))
    train_s = step * steps_per_epoch
    out = {
        "model": model.name, "val_slices": len(val), "train_slices": len(train), "steps_per_epoch": steps_per_epoch,
        "train_cpu_s": round(train_s, 1), "val_pass_cpu_s": round(pred, 1),
        "collapse_all_slices_cpu_s": round(every, 1),
        f"collapse_{cfg.collapse_slices}_slices_cpu_s": round(subset, 1),
        "val_share_before": round((pred + every) / (train_s + pred + every), 3),
        "val_share_after": round((pred + subset) / (train_s + pred + subset), 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
