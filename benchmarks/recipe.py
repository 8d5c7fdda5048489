"""The training-recipe benchmark: models trained with the recipe for a fixed budget, scored on test patients.

Each ``MODEL:EPOCHS`` is trained with ``pyroseg fit``'s recipe options
(``--augment standard --lr-schedule cosine --lr-warmup 2`` by default; validation each
epoch with one sample per image and no collapse diagnostics, which ``evaluate`` gives) into
``RUNS/<model>_e<epochs>_s<seed>``, unless that run is already finished, then
scored by :func:`pyroseg.evaluate.evaluate_run` (``best.pt``, chosen on the
validation patients) on the test patients. The epochs are the budget: choose
them so that each model's training fits the time you allow (the table says how
long each took, from ``metrics.csv``: training plus validation, without start-up).

Usage::

    PYROSEG_LGG_DIR=/path/to/kaggle_3m OMP_NUM_THREADS=1 python benchmarks/recipe.py \\
        --data $PYROSEG_LGG_DIR --image-size 64 --models unet:130,skip_vae:95 \\
        --runs runs/recipe --out docs/results/lgg-recipe-64 [--seeds 0,1] [--table-only]

Writes ``OUT/recipe.json`` (every figure, the runs' configs, versions) and
``OUT/recipe.md`` (the table); results: docs/guide/training-recipe.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from pyroseg.compare import run_state
from pyroseg.config import FitConfig, load_config_json, versions
from pyroseg.evaluate import evaluate_run
from pyroseg.runs import read_metrics_csv
from pyroseg.train import fit

METRICS = ("dice_tumour", "dice_volume", "dice_all", "iou_tumour", "false_positive_slices")


def run_name(model: str, epochs: int, seed: int) -> str:
    return f"{model}_e{epochs}_s{seed}"


def train_and_score(base: FitConfig, model: str, epochs: int, seed: int, runs: Path, *, table_only: bool) -> dict | None:
    run = runs / run_name(model, epochs, seed)
    if run_state(run, epochs) != "finished":
        if table_only:
            return None
        fit(replace(base, model=model, epochs=epochs, seed=seed, out=str(run)), overwrite=run.exists(), pictures=False)
    cached = run / "recipe_eval.json"
    if cached.is_file():
        report = json.loads(cached.read_text())
    else:
        report = evaluate_run(run, num_samples=16, device=base.device, seed=seed)
        cached.write_text(json.dumps(report, indent=2) + "\n")
    history = read_metrics_csv(run / "metrics.csv")
    cfg = load_config_json(run / "config.json")["fit"]
    return {
        "model": model, "epochs": epochs, "seed": seed, "run": str(run),
        "augment": cfg.get("augment"), "lr_schedule": cfg.get("lr_schedule"), "lr_warmup": cfg.get("lr_warmup"),
        "minutes": sum(r["train_time_s"] + r["val_time_s"] for r in history) / 60,
        "data_share": sum(r["data_time_s"] for r in history) / max(1e-9, sum(r["train_time_s"] for r in history)),
        "checkpoint": report.get("checkpoint"), "num_params": report.get("num_params"),
        **{m: report[m] for m in METRICS if m in report},
    }


def markdown(rows: list[dict], title: str) -> str:
    def cell(vals):
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not vals:
            return ""
        if len(vals) == 1:
            return f"{vals[0]:.3f}"
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})"

    lines = [f"### {title}", "",
             "| model | epochs | seeds | training minutes (each) | data share | Dice (tumour slices) | Dice (per patient 3-D) | "
             "Dice (all slices) | IoU (tumour) | weights | params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["epochs"]), []).append(r)
    for (model, epochs), rs in groups.items():
        lines.append(
            f"| {model} | {epochs} | {', '.join(str(r['seed']) for r in rs)} | {', '.join(format(r['minutes'], '.0f') for r in rs)} | "
            f"{max(r['data_share'] for r in rs):.1%} | {cell([r.get('dice_tumour') for r in rs])} | "
            f"{cell([r.get('dice_volume') for r in rs])} | {cell([r.get('dice_all') for r in rs])} | "
            f"{cell([r.get('iou_tumour') for r in rs])} | {'; '.join(str(r['checkpoint']) for r in rs)} | "
            f"{rs[0]['num_params']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--models", required=True, help="MODEL:EPOCHS,... (the epochs are each model's budget)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--augment", default="standard")
    p.add_argument("--lr-schedule", default="cosine")
    p.add_argument("--lr-warmup", type=float, default=2.0)
    p.add_argument("--val-samples", type=int, default=1, help="samples per validation image each epoch (cheap: the budget is time)")
    p.add_argument("--collapse-diagnostics", action="store_true", help="per-epoch collapse diagnostics (off: evaluate reports them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", required=True, help="folder of the run folders")
    p.add_argument("--out", required=True, help="where recipe.json and recipe.md go")
    p.add_argument("--table-only", action="store_true", help="tabulate the finished runs; train nothing")
    a = p.parse_args(argv)
    plan = []
    for item in a.models.split(","):
        model, _, epochs = item.partition(":")
        if not epochs.isdigit():
            p.error(f"--models {item}: expected MODEL:EPOCHS, e.g. unet:130")
        plan.append((model, int(epochs)))
    seeds = [int(s) for s in a.seeds.split(",")]
    base = FitConfig(data=a.data, image_size=a.image_size, augment=a.augment, lr_schedule=a.lr_schedule,
                     lr_warmup=a.lr_warmup, device=a.device, val_samples=a.val_samples,
                     collapse_diagnostics=a.collapse_diagnostics)
    rows = [r for s in seeds for m, e in plan
            if (r := train_and_score(base, m, e, s, Path(a.runs), table_only=a.table_only)) is not None]
    rows.sort(key=lambda r: ([m for m, _ in plan].index(r["model"]), r["seed"]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{Path(a.data).name}, {a.image_size}x{a.image_size}, test patients, --augment {a.augment}, "
             f"--lr-schedule {a.lr_schedule} --lr-warmup {a.lr_warmup:g}, weights best.pt by validation tumour Dice")
    (out / "recipe.json").write_text(json.dumps({"command": "python benchmarks/recipe.py " + " ".join(argv or []),
                                                 "versions": versions(), "rows": rows}, indent=2) + "\n")
    (out / "recipe.md").write_text(markdown(rows, title))
    print(markdown(rows, title))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
