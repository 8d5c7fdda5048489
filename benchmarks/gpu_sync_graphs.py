"""GPU checks of the training step that the suite does not make: host syncs per step,
and the CUDA-graph trial. One prepared script for a machine with a GPU
(``benchmarks/gpu_check_step.sh`` runs it with the suite).

    python benchmarks/gpu_sync_graphs.py sync --json sync.json      # seconds
    python benchmarks/gpu_sync_graphs.py graphs --json graphs.json  # minutes: compiling
    python benchmarks/gpu_sync_graphs.py sync --device cpu --steps 2  # the code path, anywhere

``sync``: ``torch.cuda.set_sync_debug_mode("warn")`` around ``--steps`` training
steps of ``Trainer`` as ``fit`` builds it on a GPU (fused Adam, the non-finite
guard on the device), then of ``Trainer(fused_adam=False)`` (the loop Adam,
whose guard decides on the host), and around batches made by
:class:`pyroseg.data.device.DeviceBatches` on three-annotator data: the number
of synchronising calls each made, and the first of them.

``graphs``: ``torch.compile`` of the models' networks (every direct child module
of the model: ``unet``; ``unet``, ``prior_net``, ``posterior_net``, ``fcomb``)
with ``mode="reduce-overhead"`` (CUDA graphs, one replay per network call) and
with the default mode, each inside the unchanged Pyro step, interleaved with
the eager Trainer and the hand-written step (eager and reduce-overhead), timed
in blocks of ``--steps`` steps. Pyro's tracing stays outside the graphs.
Reports compile seconds and ms per step; a variant that fails is reported with
its error.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, interleave, median, median_ratio, random_batch, repeat, sync  # noqa: E402


def _trainer(name: str, size: int, device, **kw):
    import pyro

    from pyroseg.models import build_model
    from pyroseg.train import Trainer

    pyro.set_rng_seed(0)
    model = build_model(name, image_size=size).to(device).to(memory_format=torch.channels_last)
    return Trainer(model, **kw)


def _count_syncs(fn, device) -> dict:
    if device.type != "cuda":
        fn()
        return {"syncs": None, "note": "not a CUDA device: nothing to count"}
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            sync_mode_off = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs": len(msgs), "first": msgs[:3], "ok": sync_mode_off}


def run_sync(args) -> dict:
    import numpy as np
    from torch.utils.data import DataLoader

    from pyroseg.data import SegData, SegDataset, collate_batch
    from pyroseg.data.device import DeviceBatches
    from pyroseg.train import EpochSampler

    device = torch.device(args.device)
    image, mask = random_batch(args.batch, args.size, device=device)
    rows = []
    for name in args.models:
        for label, kw in (("trainer (fit's GPU default: fused Adam, device guard)", {}),
                          ("trainer, loop Adam (host guard)", {"fused_adam": False})):
            t = _trainer(name, args.size, device, **kw)
            for _ in range(3):
                t.step(image, mask)
            r = _count_syncs(lambda t=t: [t.step(image, mask) for _ in range(args.steps)], device)
            rows.append({"model": name, "variant": label, "steps": args.steps, "check_every": t.check_every, **r})
            print(rows[-1], flush=True)
    rng = np.random.default_rng(0)
    n, s = 256, args.size
    data = SegData(images=rng.integers(0, 256, (n, 3, s, s), dtype=np.uint8),
                   masks=(rng.random((n, 3, s, s)) > 0.9).astype(np.uint8),
                   patients=np.array([f"p{i // 16}" for i in range(n)]), slice_numbers=np.arange(n))
    ds = SegDataset(data, random_annotator=True)
    sampler = EpochSampler(ds, seed=0)
    batches = DeviceBatches(ds, sampler, args.batch, device)
    next(iter(batches))
    r = _count_syncs(lambda: list(batches), device)
    rows.append({"model": "-", "variant": "DeviceBatches, 3 annotators, one epoch", "steps": len(batches), **r})
    loader = DataLoader(ds, batch_size=args.batch, sampler=sampler, collate_fn=collate_batch)
    r = _count_syncs(lambda: [b["image"].to(device, non_blocking=True) for b in loader], device)
    rows.append({"model": "-", "variant": "DataLoader + .to(device), one epoch", "steps": len(loader), **r})
    print(rows[-2], rows[-1], sep="\n", flush=True)
    return {"what": "synchronising calls (torch.cuda.set_sync_debug_mode('warn')) per block of steps", "rows": rows}


def _compile_children(model, mode: str | None) -> list[str]:
    names = []
    for name, child in model.named_children():
        child.compile(mode=mode) if mode else child.compile()
        names.append(name)
    return names


def run_graphs(args) -> dict:
    import pyro

    from benchmarks.plain import PlainStep

    device = torch.device(args.device)
    image, mask = random_batch(args.batch, args.size, device=device)
    out = []
    for name in args.models:
        fns, info = {}, {}
        eager = _trainer(name, args.size, device)
        base = copy.deepcopy(eager.model)

        def tstep(t):
            def one_step():
                pyro.clear_param_store()
                return t.step(image, mask)
            return one_step

        plain = PlainStep(copy.deepcopy(base))
        fns["plain"] = lambda plain=plain: plain.step(image, mask, 1.0, item=False)
        fns["trainer_eager"] = tstep(eager)
        variants = [("trainer_reduce_overhead", "reduce-overhead"), ("trainer_compile_default", None)]
        for label, mode in variants:
            try:
                t = _trainer(name, args.size, device)
                t.model.load_state_dict(base.state_dict())
                info[label] = {"compiled": _compile_children(t.model, mode)}
                t0 = time.perf_counter()
                for _ in range(3):  # compile, record graphs, warm up
                    tstep(t)()
                sync(device)
                info[label]["compile_s"] = time.perf_counter() - t0
                fns[label] = tstep(t)
            except Exception as e:  # noqa: BLE001 - reported
                info[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        try:
            p2 = PlainStep(copy.deepcopy(base))
            _compile_children(p2.model, "reduce-overhead")
            t0 = time.perf_counter()
            for _ in range(3):
                p2.step(image, mask, 1.0, item=False)
            sync(device)
            info["plain_reduce_overhead"] = {"compile_s": time.perf_counter() - t0}
            fns["plain_reduce_overhead"] = lambda p2=p2: p2.step(image, mask, 1.0, item=False)
        except Exception as e:  # noqa: BLE001 - reported
            info["plain_reduce_overhead"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        try:
            times = interleave({k: repeat(f, args.steps) for k, f in fns.items()}, warmup=2, repeats=args.repeats, device=device)
        except Exception as e:  # noqa: BLE001 - reported
            out.append({"model": name, "error": f"{type(e).__name__}: {e}", "info": info})
            continue
        for k in fns:
            row = {"model": name, "variant": k, "ms_per_step": 1e3 * median(times[k]) / args.steps,
                   "ratio_vs_plain": median_ratio(times[k], times["plain"]),
                   "ratio_vs_trainer_eager": median_ratio(times[k], times["trainer_eager"]), **info.get(k, {})}
            out.append(row)
            print(row, flush=True)
        for k, v in info.items():
            if "error" in v:
                out.append({"model": name, "variant": k, **v})
                print(out[-1], flush=True)
    return {"what": f"batch {args.batch}, {args.size}x{args.size}, blocks of {args.steps} steps, {args.repeats} interleaved "
                    "repeats; plain = the hand-written step without .item()", "rows": out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["sync", "graphs"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="unet,prob_unet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    doc = {"environment": environment(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    doc[args.what] = run_sync(args) if args.what == "sync" else run_graphs(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
