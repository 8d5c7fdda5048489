"""The ``throughput`` item: training throughput, images per second for every model at every size,
batch 32, with peak memory, each configuration in a fresh process.

The yardstick is the hand-written PyTorch U-Net step (``plain_unet``). These
figures come from separate processes run one after another, not interleaved:
on a busy machine read the ratios to the yardstick of the same size, measured
minutes apart, with care.
"""

from __future__ import annotations

import logging

import torch

from benchmarks.common import Settings, run_worker
from benchmarks.worker import HOST_SYNC

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(s: Settings) -> dict:
    rows = []
    for size in s.sizes:
        plain = None
        before = tuple(f"{m}{HOST_SYNC}" for m in s.models if m in s.overhead_models)  # the earlier, host-sync step
        for name in ("plain_unet", *s.models, *before):
            spec = {"kind": "train", "model": name, "size": size, "batch": s.batch, "warmup": s.throughput_warmup,
                    "repeats": s.throughput_repeats, "device": s.device, "threads": torch.get_num_threads(), "block": s.block}
            r = run_worker(spec, in_process=s.in_process)
            if "error" in r:
                log.warning("throughput %s at %d: %s", name, size, r["error"])
                rows.append({"model": name, "size": size, "error": r["error"]})
                continue
            row = {
                "model": name,
                "size": size,
                "images_per_s": r["images_per_s"],
                "median_step_ms": 1e3 * r["median_step_s"],
                "peak_rss_mib": r["peak_rss_mib"],
                "rss_above_baseline_mib": r["peak_rss_mib"] - r["baseline_rss_mib"],
            }
            if "cuda_peak_mib" in r:
                row["cuda_peak_mib"] = r["cuda_peak_mib"]
            if name == "plain_unet":
                plain = r["images_per_s"]
            row["relative_to_plain_unet"] = r["images_per_s"] / plain if plain else None
            rows.append(row)
            log.info("throughput %s at %d: %.1f images/s", name, size, r["images_per_s"])
    return {
        "what": f"training steps on one fixed batch of {s.batch}, timed {s.block} in a row, median of {s.throughput_repeats} after "
                f"{s.throughput_warmup} warm-up, one fresh process per row; peak memory: "
                + ("torch.cuda.max_memory_allocated" if torch.device(s.device).type == "cuda" else "ru_maxrss of that process"),
        "rows": rows,
    }
