"""CPU throughput of data-parallel training: 1 process vs N, and the share of a
step spent communicating.

    python benchmarks/ddp_cpu.py --nproc 1,2 --model unet --image-size 64 --batch-size 32

For each N it starts ``torchrun --standalone --nproc_per_node N`` on this file
(``--worker``); every rank trains with the same code path as ``pyroseg fit``
(``Trainer`` with ``ELBOLoss`` in DDP, ``--batch-size`` the global batch split
over the ranks) on random images, alternating blocks of

* ``sync`` steps: the real thing (DDP's gradient all-reduce + the loss all-reduce);
* ``nosync`` steps: the same steps under ``DDP.no_sync()`` with no loss
  all-reduce, so no communication at all (the ranks drift apart: timing only).

Reported (rank 0, medians over blocks): images/s of the global batch for
``sync`` (wall clock, the slowest rank), ``comm share = 1 - t_nosync / t_sync``
per step, and the same from CPU time summed over the ranks (images per
CPU-second: what a step costs in compute, which a machine shared with other
jobs distorts far less than wall time). With one process there is no process
group (the plain ``fit`` path) and the shares are 0 by definition. Pin it (``taskset``) and set ``OMP_NUM_THREADS`` yourself: the
script prints the CPUs each rank may use, so a table made with too few cores
says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path


def _worker(args) -> None:
    import pyro
    import torch

    from pyroseg import distributed
    from pyroseg.models import build_model
    from pyroseg.train import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = distributed.setup(torch.device("cpu"))
    local = args.batch_size // ctx.world_size
    pyro.set_rng_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = build_model(args.model, image_size=args.image_size, widths=widths)
    trainer = Trainer(model, lr=1e-4)
    ddp = None
    if ctx.enabled:
        ddp = trainer.loss_fn = ctx.wrap(trainer.loss_fn, find_unused_parameters=model.has_latent)
        trainer.reduce = ctx.mean
    ctx.seed(0)
    g = torch.Generator().manual_seed(ctx.rank)
    image = torch.rand(local, 3, args.image_size, args.image_size, generator=g)
    mask = (torch.rand(local, 1, args.image_size, args.image_size, generator=g) > 0.9).float()

    def block(mode: str) -> tuple[float, float]:
        """Wall seconds per step (the slowest rank's) and CPU seconds per step
        (summed over ranks) over ``args.steps`` steps."""
        reduce = trainer.reduce
        if mode == "nosync":
            trainer.reduce = None
        ctx.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            with ddp.no_sync() if (mode == "nosync" and ddp is not None) else nullcontext():
                trainer.step(image, mask, beta=1.0)
        dt, dc = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
        trainer.reduce = reduce
        ctx.barrier()
        seen = ctx.gather((dt, dc))
        return float(max(w for w, _ in seen)), float(sum(c for _, c in seen))

    for _ in range(args.warmup):
        trainer.step(image, mask, beta=1.0)
    times: dict[str, list[float]] = {"sync": [], "nosync": []}
    cpu: dict[str, list[float]] = {"sync": [], "nosync": []}
    for _ in range(args.blocks):
        for mode in ("sync", "nosync") if ctx.enabled else ("sync",):
            wall, used = block(mode)
            times[mode].append(wall)
            cpu[mode].append(used)
    if ctx.is_main:
        t_sync = statistics.median(times["sync"])
        t_nosync = statistics.median(times["nosync"]) if times["nosync"] else t_sync
        c_sync = statistics.median(cpu["sync"])
        c_nosync = statistics.median(cpu["nosync"]) if cpu["nosync"] else c_sync
        out = {
            "processes": ctx.world_size,
            "model": args.model,
            "image_size": args.image_size,
            "global_batch": args.batch_size,
            "batch_per_process": local,
            "threads_per_process": torch.get_num_threads(),
            "cpus_allowed": sorted(os.sched_getaffinity(0)),
            "step_s": t_sync,
            "step_nosync_s": t_nosync,
            "images_per_s": args.batch_size / t_sync,
            "comm_share": max(0.0, 1.0 - t_nosync / t_sync),
            "cpu_s_per_step": c_sync,
            "images_per_cpu_s": args.batch_size / c_sync,
            "comm_share_cpu": max(0.0, 1.0 - c_nosync / c_sync),
            "blocks": times,
            "blocks_cpu": cpu,
        }
        Path(args.result).write_text(json.dumps(out))
    ctx.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    p.add_argument("--model", default="unet")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--widths", default="16,32,64,128")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    rows = []
    for n in [int(x) for x in args.nproc.split(",")]:
        if args.batch_size % n:
            sys.exit(f"--batch-size {args.batch_size} is not divisible by {n} processes")
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "r.json"
            worker = [__file__, "--worker", "--result", str(result), "--model", args.model,
                      "--image-size", str(args.image_size), "--widths", args.widths, "--batch-size", str(args.batch_size),
                      "--steps", str(args.steps), "--blocks", str(args.blocks), "--warmup", str(args.warmup)]
            if n == 1:  # the plain path: no torchrun, no process group
                cmd = [sys.executable, *worker]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *worker]
            subprocess.run(cmd, check=True)
            rows.append(json.loads(result.read_text()))
    base = rows[0]["images_per_s"]
    cbase = rows[0]["images_per_cpu_s"]
    print(f"{'processes':>9} {'batch/proc':>10} {'images/s':>9} {'vs first':>8} {'step ms':>8} {'no-comm ms':>10} "
          f"{'comm share':>10} {'img/cpu-s':>9} {'vs first':>8} {'comm (cpu)':>10}  cpus")
    for r in rows:
        print(f"{r['processes']:>9} {r['batch_per_process']:>10} {r['images_per_s']:>9.1f} {r['images_per_s'] / base:>7.2f}x "
              f"{1000 * r['step_s']:>8.1f} {1000 * r['step_nosync_s']:>10.1f} {100 * r['comm_share']:>9.1f}% "
              f"{r['images_per_cpu_s']:>9.1f} {r['images_per_cpu_s'] / cbase:>7.2f}x {100 * r['comm_share_cpu']:>9.1f}%  "
              f"{r['cpus_allowed']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
