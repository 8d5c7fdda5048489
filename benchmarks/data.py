"""The ``data`` item. First load (decode + resize, into a fresh temporary cache) and
cached load of the LGG development copy at each size, and the share of a
training epoch spent waiting for the DataLoader.

Targets: cached load of the whole copy < 1 s; data waiting < 5 % of an epoch
(< 2 % on a GPU). The wait is measured with the DataLoader (``--data-on-device
off``) and with the batches made on the device (``on``).
The LGG copy comes from ``--lgg`` or ``$PYROSEG_LGG_DIR``; without it the load
timings are skipped (with a note) and the data-wait share is measured on
synthetic data.
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch

from benchmarks.common import Settings, median, run_worker

__all__ = ["run"]

log = logging.getLogger(__name__)

CACHED_TARGET_S = 1.0
WAIT_TARGET = 0.05
WAIT_TARGET_GPU = 0.02  # on a GPU, where a step takes milliseconds


def _loads(root: str, sizes, repeats: int) -> list[dict]:
    from pyroseg.data.lgg import cache_key, load_lgg, scan_lgg

    rows = []
    with tempfile.TemporaryDirectory(prefix="pyroseg-bench-cache-") as tmp:
        for size in sizes:
            t0 = time.perf_counter()
            data = load_lgg(root, size, cache_dir=tmp)
            first = time.perf_counter() - t0
            cached = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                load_lgg(root, size, cache_dir=tmp)
                cached.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the part of a cached load that is listing and stat-ing the TIFFs
            files = scan_lgg(root)
            cache_key(files, files[0].image_path.parents[1], size)
            scan = time.perf_counter() - t0
            rows.append({
                "size": size,
                "slices": len(data),
                "first_load_s": first,
                "cached_load_s": median(cached),
                "cached_scan_and_key_s": scan,
                "meets_target": median(cached) < CACHED_TARGET_S,
            })
            log.info("data at %d: first %.2f s, cached %.3f s", size, first, median(cached))
    return rows


def run(s: Settings) -> dict:
    wait_target = WAIT_TARGET_GPU if torch.device(s.device).type == "cuda" else WAIT_TARGET
    out: dict = {"targets": {"cached_load": f"< {CACHED_TARGET_S:g} s", "data_wait": f"< {100 * wait_target:g} % of an epoch"}}
    if s.lgg_dir:
        out["loads"] = _loads(s.lgg_dir, s.data_sizes, repeats=1 if s.quick else 3)
    else:
        out["loads"] = []
        out["note"] = "load timings skipped: no LGG copy (set PYROSEG_LGG_DIR or pass --lgg); data wait measured on synthetic data"
    size = min(s.data_sizes) if s.quick else 64
    out["waits"] = []
    for mode in s.data_modes:  # --data-on-device off: the DataLoader; on: batches made on the device
        spec = {"kind": "epoch", "model": "unet", "size": size, "batch": s.batch, "device": s.device,
                "threads": torch.get_num_threads(), "lgg_dir": s.lgg_dir, "synthetic_patients": s.synthetic_patients,
                "max_batches": s.data_wait_batches, "warmup_batches": 1 if s.quick else 2, "data_on_device": mode}
        r = run_worker(spec, in_process=s.in_process)
        if "error" in r:
            out["waits"].append({"data_on_device": mode, "error": r["error"]})
            continue
        out["waits"].append({
            "model": "unet", "size": size, "data": "lgg" if s.lgg_dir else "synthetic", "batches": r["batches"],
            "data_on_device": mode, "sync_steps": r["sync_steps"],
            "data_wait_s": r["data_wait_s"], "step_s": r["step_s"], "epoch_s": r["epoch_s"], "images_per_s": r["images_per_s"],
            "data_wait_share": r["data_wait_share"], "meets_target": r["data_wait_share"] < wait_target,
        })
        log.info("data wait (--data-on-device %s): %.2f %% of the epoch", mode, 100 * r["data_wait_share"])
    out["wait"] = out["waits"][0]  # the DataLoader's, as before
    return out
