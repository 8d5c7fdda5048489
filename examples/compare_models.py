"""Train every model under one protocol, over seeds, and write the comparison tables (what `pyroseg compare` does).

    python examples/compare_models.py --data /path/to/kaggle_3m --epochs 30 --seeds 3 --out comparison/
"""

from __future__ import annotations

import argparse

from pyroseg.compare import compare_models, render_markdown
from pyroseg.config import FitConfig
from pyroseg.models import MODELS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/comparison")
    args = p.parse_args()
    base = FitConfig(data=args.data, image_size=args.image_size, epochs=args.epochs)
    doc = compare_models(base, args.out, models=args.models.split(","), seeds=args.seeds)
    print(render_markdown(doc))


if __name__ == "__main__":
    main()
