"""Run the benchmark suite: ``python -m benchmarks.run --out benchmarks/results/cpu``.

Writes ``results.json`` (every figure, the settings and the environment) and
``summary.md`` (tables, targets met or not) to ``--out``. Items: ``overhead``,
``throughput``, ``sampling``, ``data``, ``scaling``, ``options`` (default: all).
``--quick`` is a seconds-long smoke run with tiny sizes (the tests run it);
its figures mean nothing. ``--device auto`` uses the GPU when there is one.

On a quiet machine, refresh the README figures with::

    python -m benchmarks.run --out benchmarks/results/cpu                 # all cores
    python -m benchmarks.run --device cuda --out benchmarks/results/gpu   # a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data, options, overhead, sampling, scaling, throughput  # noqa: E402
from benchmarks.common import Settings, environment  # noqa: E402
from benchmarks.report import markdown  # noqa: E402

ITEMS = {
    "overhead": overhead.run,
    "throughput": throughput.run,
    "sampling": sampling.run,
    "data": data.run,
    "scaling": scaling.run,
    "options": options.run,
}

log = logging.getLogger("benchmarks")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output folder [default: benchmarks/results/<cpu|gpu>, with --quick results/quick-<cpu|gpu>]")
    p.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds: a smoke test, not a measurement")
    p.add_argument("--lgg", default=os.environ.get("PYROSEG_LGG_DIR"),
                   help="LGG kaggle_3m folder for the data and scaling items [default: $PYROSEG_LGG_DIR]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's own choice]")
    p.add_argument("--models", default=None, help="comma-separated models [default: all six]")
    p.add_argument("--sizes", default=None, help="comma-separated image sizes for the throughput item [default: 64,128]")
    p.add_argument("--merge", action="store_true",
                   help="keep the other items already in --out/results.json (refresh some items only)")
    p.add_argument("--with-compile", action="store_true",
                   help="options item: also measure torch.compile (compiling takes minutes on a CPU)")
    return p.parse_args(argv)


def resolve(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"Error: --device {name}: no CUDA GPU is available here")
    if name != "cpu" and not name.startswith("cuda"):
        raise SystemExit(f"Error: --device {name!r}: expected auto, cpu or cuda")
    return name


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    items = [i.strip() for i in args.items.split(",") if i.strip()]
    bad = [i for i in items if i not in ITEMS]
    if bad:
        raise SystemExit(f"Error: --items {','.join(bad)}: unknown; expected some of {','.join(ITEMS)}")
    device = resolve(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw: dict = {"device": device, "lgg_dir": args.lgg or None, "compile": args.with_compile}
    if args.models:
        kw["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.sizes:
        kw["sizes"] = tuple(int(x) for x in args.sizes.split(",") if x.strip())
    settings = Settings.for_quick(**kw) if args.quick else Settings.for_full(**kw)
    kind = "gpu" if device.startswith("cuda") else "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / (f"quick-{kind}" if args.quick else kind)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = {"command": command.strip(), "environment": environment(device), "settings": settings.to_dict(), "items": {}}
    if args.merge and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        doc["items"] = dict(old.get("items", {}))  # each re-run item replaces its old figures when it finishes
        doc["merged_from"] = old.get("merged_from", []) + [{"command": old["command"], "environment": old["environment"]}]
    t_all = time.perf_counter()
    for name in items:
        log.info("-- %s", name)
        t0 = time.perf_counter()
        doc["items"][name] = ITEMS[name](settings)
        doc["items"][name]["seconds"] = time.perf_counter() - t0
        doc["items"][name]["command"] = doc["command"]
        _write(out, doc)  # after every item: a crash later keeps what was measured
    doc["seconds"] = time.perf_counter() - t_all
    _write(out, doc)
    log.info("wrote %s and %s", out / "results.json", out / "summary.md")
    return doc


def _write(out: Path, doc: dict) -> None:
    from pyroseg.checkpoint import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(out / "summary.md", markdown(doc))


if __name__ == "__main__":
    main()
