"""The ``scaling`` item. Epoch time against the number of training slices (a
fraction of the training split) and against the image size (a fixed number of
slices per epoch, so that 256x256 stays affordable), each run in a fresh process.

Linear would be: time proportional to slices, and to pixels (4x per doubling of
the side). The report gives time per slice and per megapixel so the bend shows.
"""

from __future__ import annotations

import logging

import torch

from benchmarks.common import Settings, run_worker

__all__ = ["run"]

log = logging.getLogger(__name__)


def _spec(s: Settings, size: int, **kw) -> dict:
    return {"kind": "epoch", "model": s.scaling_model, "size": size, "batch": s.batch, "device": s.device,
            "threads": torch.get_num_threads(), "lgg_dir": s.lgg_dir, "synthetic_patients": s.synthetic_patients,
            "warmup_batches": 1 if s.quick else 2, "data_on_device": "auto", **kw}


def _row(r: dict, **extra) -> dict:
    if "error" in r:
        return {**extra, "error": r["error"]}
    px = r["size"] ** 2
    return {
        **extra,
        "size": r["size"],
        "slices": r["slices"],
        "epoch_s": r["epoch_s"],
        "ms_per_slice": 1e3 * r["epoch_s"] / r["images"],
        "us_per_pixel": 1e6 * r["epoch_s"] / (r["images"] * px),
        "data_wait_share": r["data_wait_share"],
        "peak_rss_mib": r["peak_rss_mib"],
        **({"cuda_peak_mib": r["cuda_peak_mib"]} if "cuda_peak_mib" in r else {}),
    }


def run(s: Settings) -> dict:
    by_slices = []
    for f in s.scaling_fractions:
        r = run_worker(_spec(s, s.scaling_size, fraction=f), in_process=s.in_process)
        by_slices.append(_row(r, fraction=f))
        log.info("scaling: fraction %.2f -> %s", f, by_slices[-1].get("epoch_s"))
    by_size = []
    last_peak = None
    for size in s.scaling_sizes:
        if last_peak is not None and by_size and "size" in by_size[-1]:
            # activations grow with the pixels: estimate before trying
            est = last_peak * (size / by_size[-1]["size"]) ** 2
            if est > s.scaling_max_mib:
                by_size.append({"size": size, "skipped": f"estimated peak memory {est:.0f} MiB > {s.scaling_max_mib:.0f} MiB"})
                continue
        r = run_worker(_spec(s, size, slices=s.scaling_size_slices), in_process=s.in_process)
        row = _row(r)
        by_size.append(row if "size" in row else {"size": size, **row})
        last_peak = row.get("cuda_peak_mib", row.get("peak_rss_mib"))
        log.info("scaling: size %d -> %s", size, row.get("epoch_s"))
    for rows, key in ((by_slices, "ms_per_slice"), (by_size, "us_per_pixel")):
        good = [r for r in rows if key in r]
        if good:
            ref = good[0][key]
            for r in good:
                r[f"{key}_relative"] = r[key] / ref  # 1.0 everywhere = linear
    return {
        "what": f"model {s.scaling_model}, batch {s.batch}, fit's data path (--data-on-device auto): one timed epoch after a short warm-up, fresh process per row. "
                f"by_slices at {s.scaling_size}x{s.scaling_size} over fractions of the training split; by_size with "
                f"{s.scaling_size_slices} slices per epoch. *_relative = 1.0 means linear.",
        "data": "lgg" if s.lgg_dir else "synthetic",
        "by_slices": by_slices,
        "by_size": by_size,
    }
