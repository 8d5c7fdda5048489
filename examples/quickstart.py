"""Train, evaluate and sample through the public API (what `pyroseg fit/evaluate/sample` do).

    python examples/quickstart.py [--data PATH_TO_kaggle_3m] [--model prob_unet] [--epochs 20]

With no --data it uses the built-in synthetic phantoms with four disagreeing annotators per slice
(``synthetic-ambiguous``), so it runs anywhere in about a minute and the samples have something to vary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pyroseg.config import FitConfig
from pyroseg.data import load_source
from pyroseg.evaluate import evaluate_run
from pyroseg.runs import load_run
from pyroseg.train import fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic-ambiguous")
    p.add_argument("--model", default="prob_unet")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default="runs/example")
    args = p.parse_args()

    # 1. train: one config object, one call; the run folder holds everything
    run_dir = fit(FitConfig(model=args.model, data=args.data, epochs=args.epochs, out=args.out), overwrite=True)

    # 2. evaluate on the held-out test patients
    report = evaluate_run(run_dir, num_samples=16)
    print(json.dumps({k: report[k] for k in ("dice_all", "dice_tumour", "dice_volume", "bce", "ged", "hm_iou")}, indent=2))

    # 3. draw masks for a few test slices directly with the model
    run = load_run(run_dir)
    data = load_source(run.config.data, run.config.image_size, seed=run.config.seed)
    test = data.subset(run.split["test"])
    image = torch.from_numpy(test.images[:4]).float() / 255  # (4, 3, H, W)
    with torch.inference_mode():
        probs = run.model.sample(image, num_samples=32)  # (32, 4, 1, H, W) mask probabilities
    masks = probs >= 0.5
    print("mask area per sample, first slice:", masks[:, 0].flatten(1).sum(1).tolist())
    print("mean per-pixel std over samples:", float(probs.std(0).mean()))
    print(f"pictures: {Path(run_dir) / 'val_samples.png'}, {Path(run_dir) / 'curves.png'}")
    np.save(Path(run_dir) / "example_probs.npy", probs.numpy().astype(np.float16))


if __name__ == "__main__":
    main()
