"""Single-GPU training throughput with and without bf16 autocast, for unet,
prob_unet and hprob_unet at 128x128: one prepared script for a machine with a GPU.

    python benchmarks/gpu_ddp_bf16.py --json gpu.json            # on a GPU, ~2-4 minutes
    python benchmarks/gpu_ddp_bf16.py --device cpu --dry-run      # checks the code path anywhere

Each (model, precision) pair trains with pyroseg's own step (``Trainer``:
``ELBOLoss`` forward, backward, non-finite guard, Adam) on random images,
``--warmup`` steps first, then ``--repeats`` timed blocks of ``--steps`` steps
(synchronised), and reports the median images/s, the peak GPU memory and the
loss of one fixed batch under that precision next to fp32 (bf16 must not change
what is optimised by more than rounding). Precisions:

* ``fp32``: PyTorch's defaults (TF32 off for matmuls, on for cuDNN convolutions);
* ``fp32-notf32``: TF32 off everywhere (the strict baseline);
* ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` around the loss's forward
  only (backward outside it, as PyTorch recommends); Pyro's log-densities and
  sums run in fp32 where autocast lists them (``binary_cross_entropy_with_logits``,
  ``sum``, ``exp``, ``log``), the loss is cast to fp32.

``--ddp`` wraps the loss in ``DistributedDataParallel`` (run it under ``torchrun
--nproc_per_node 1``: nccl with one rank) to show what the wrapper itself costs
on one GPU. Output: a table on stdout and, with ``--json``, one row per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

MODELS = ("unet", "prob_unet", "hprob_unet")
PRECISIONS = ("fp32", "fp32-notf32", "bf16")


class AutocastLoss(nn.Module):
    """``loss_fn``'s forward under ``torch.autocast(device, bfloat16)``, returned in fp32."""

    def __init__(self, inner: nn.Module, device_type: str):
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            loss = self.inner(*args, **kwargs)
        return loss.float()


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
    torch.backends.cudnn.allow_tf32 = on


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pair(name: str, precision: str, args, device: torch.device, ctx) -> dict:
    import pyro

    from pyroseg.models import build_model
    from pyroseg.train import Trainer

    _set_tf32(precision == "fp32")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = build_model(name, image_size=args.image_size, widths=widths).to(device)
    trainer = Trainer(model, lr=1e-4)
    fp32_loss_fn = trainer.loss_fn
    if precision == "bf16":
        trainer.loss_fn = AutocastLoss(trainer.loss_fn, device.type)
    if ctx is not None and ctx.enabled:
        trainer.loss_fn = ctx.wrap(trainer.loss_fn, find_unused_parameters=model.has_latent)
        trainer.reduce = ctx.mean
    g = torch.Generator().manual_seed(1)
    image = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    mask = (torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=g) > 0.9).float().to(device)

    # the loss of one fixed batch and noise under this precision vs fp32 (before any step)
    with torch.no_grad():
        pyro.set_rng_seed(2)
        ref = float(fp32_loss_fn(image, mask, 1.0, 1.0))
        pyro.set_rng_seed(2)
        here = float(trainer.loss_fn(image, mask, 1.0, 1.0))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        trainer.step(image, mask, beta=1.0)
    _sync(device)
    per_block = []
    applied = 0
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            applied += trainer.step(image, mask, beta=1.0).applied_tensor  # on the device: no read per step
        _sync(device)
        per_block.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(per_block)
    return {
        "model": name,
        "precision": precision,
        "image_size": args.image_size,
        "batch": args.batch_size,
        "params": model.num_params,
        "step_ms": 1000 * step_s,
        "step_ms_blocks": [1000 * t for t in per_block],
        "images_per_s": args.batch_size / step_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss_fp32_first_batch": ref,
        "loss_this_precision_first_batch": here,
        "loss_rel_diff": abs(here - ref) / abs(ref),
        "steps_applied": f"{int(applied)}/{args.repeats * args.steps}",
        "ddp": bool(ctx is not None and ctx.enabled),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--widths", default="16,32,64,128")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks; the median is reported")
    p.add_argument("--ddp", action="store_true", help="wrap in DDP (run under torchrun --nproc_per_node 1)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, 1 step: checks the code path (CPU is fine)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.dry_run:
        args.image_size, args.widths, args.batch_size = 32, "8,16,32,64", 2
        args.warmup, args.steps, args.repeats = 1, 1, 1

    from pyroseg import distributed
    from pyroseg.train import resolve_device

    device = resolve_device(args.device)
    ctx = None
    if args.ddp:
        if not distributed.launched_by_torchrun():
            raise SystemExit("--ddp: start this under torchrun --standalone --nproc_per_node 1")
        ctx = distributed.setup(device)
        device = ctx.device
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    env = {"torch": torch.__version__, "device": str(device), "host": platform.node(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            row = run_pair(name, precision, args, device, ctx)
            rows.append({**row, **env})
            print(f"{name:>11} {precision:>12}  {row['images_per_s']:9.1f} img/s  {row['step_ms']:8.2f} ms/step  "
                  f"peak {row['peak_mem_gib'] if row['peak_mem_gib'] is not None else float('nan'):6.2f} GiB  "
                  f"loss vs fp32 {row['loss_rel_diff']:.1e}  applied {row['steps_applied']}", flush=True)
    base = {r["model"]: r["images_per_s"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        r["speedup_vs_fp32"] = r["images_per_s"] / base[r["model"]] if r["model"] in base else None
    if args.json and (ctx is None or ctx.is_main):
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if ctx is not None:
        ctx.close()


if __name__ == "__main__":
    main()
