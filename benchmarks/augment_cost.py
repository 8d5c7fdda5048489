"""CPU-time cost of augmentation against a training step: unet, LGG 64x64, batch 32.

Thread CPU time (``time.thread_time``), one thread, so the shares hold on a loaded
machine. Usage: ``PYROSEG_LGG_DIR=... python benchmarks/augment_cost.py [BATCHES]``.
Results: docs/guide/training-recipe.md (Measurements).
"""

from __future__ import annotations

import os
import sys
import time

import pyro
import torch

from pyroseg.augment import SPECS, augment_batch, step_generator
from pyroseg.data import SegDataset, collate_batch, load_source
from pyroseg.models import build_model
from pyroseg.train import Trainer

BATCH = 32


def main(batches: int = 8) -> None:
    torch.set_num_threads(1)
    data = load_source(os.environ["PYROSEG_LGG_DIR"], 64, seed=0)
    dataset = SegDataset(data, random_annotator=True)
    pyro.set_rng_seed(0)
    trainer = Trainer(build_model("unet", image_size=64).to(memory_format=torch.channels_last), lr=1e-3)
    for name in ("none", "flip", "standard"):
        load = aug = step = 0.0
        for i in range(batches):
            t = time.thread_time()
            batch = collate_batch(dataset.__getitems__(list(range(BATCH * i, BATCH * (i + 1)))))
            load += time.thread_time() - t
            t = time.thread_time()
            image, mask = batch["image"], batch["mask"]
            if name != "none":
                image, mask = augment_batch(image, mask, SPECS[name], generator=step_generator(0, i))
            aug += time.thread_time() - t
            t = time.thread_time()
            trainer.step(image, mask)
            step += time.thread_time() - t
        print(f"{name:9s} per batch of {BATCH}: load {1e3 * load / batches:.1f} ms, augment {1e3 * aug / batches:.1f} ms, "
              f"step {1e3 * step / batches:.0f} ms CPU; data share {(load + aug) / (load + aug + step):.2%}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
