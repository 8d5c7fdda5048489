"""What every benchmark item shares: settings, timing, the environment record.

Timing rules (these machines are noisy, so figures are ratios where a ratio is
the honest figure):

* every timed call is preceded by warm-up calls that are not recorded;
* variants that are compared are **interleaved**: repeat ``r`` times
  ``[variant A, variant B, ...]`` (the order rotated each round), so that a burst
  of load from another process hits all of them alike;
* the figure is the **median** over repeats; a ratio is the median of the
  per-round ratios (each round's variants ran seconds apart);
* on CUDA the device is synchronised before every clock read.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "Settings",
    "sync",
    "timed",
    "interleave",
    "median",
    "median_ratio",
    "environment",
    "peak_rss_mib",
    "run_worker",
    "random_batch",
    "repeat",
]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """How much each item measures. ``Settings.for_full()`` is what the README figures
    come from; ``Settings.for_quick()`` is a seconds-long smoke run (tests use it).
    (The constructors are not named ``full``/``quick``: a classmethod named like a
    field would shadow the field's default.)"""

    device: str = "cpu"
    quick: bool = False
    batch: int = 32
    sizes: tuple[int, ...] = (64, 128)
    models: tuple[str, ...] = ("unet", "vae", "skip_vae", "hvae", "prob_unet", "hprob_unet")
    # 1. overhead
    overhead_models: tuple[str, ...] = ("unet", "prob_unet")
    overhead_size: int = 64
    overhead_warmup: int = 3
    overhead_repeats: int = 15
    # 2. throughput (one fresh subprocess per model and size)
    throughput_warmup: int = 2
    throughput_repeats: int = 5
    # 3. sampling
    sample_size: int = 64
    sample_images: int = 1
    sample_ns: tuple[int, ...] = (1, 16, 100)
    sample_warmup: int = 2
    sample_repeats: int = 7
    # 4. data
    lgg_dir: str | None = None
    data_sizes: tuple[int, ...] = (64, 128)
    data_wait_batches: int = 30
    # 5. scaling
    scaling_model: str = "unet"
    scaling_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    scaling_size: int = 64
    scaling_sizes: tuple[int, ...] = (64, 128, 256)
    scaling_size_slices: int = 256  # slices per epoch in the image-size sweep
    scaling_max_mib: float = 8000.0  # skip an image size whose estimated peak memory exceeds this
    synthetic_patients: int = 60  # when there is no LGG copy: 60 x 16 = 960 synthetic slices
    # optimisation switches measured on/off
    options_model: str = "prob_unet"
    options_repeats: int = 9
    compile: bool = False  # also measure torch.compile (minutes of compiling on a CPU)
    # steps per timed call (0: 1 on CPU, 20 on a GPU, where a sync after every step would
    # hide what a step that never waits for the device gains); figures are per step
    step_block: int = 0
    # data item: the --data-on-device modes whose data-wait share is measured
    data_modes: tuple[str, ...] = ("off", "on")
    # workers in this process instead of fresh ones (quick mode: no interpreter start-ups;
    # peak memory is then this process's)
    in_process: bool = False

    @classmethod
    def for_full(cls, **kw) -> Settings:
        return cls(**kw)

    @classmethod
    def for_quick(cls, **kw) -> Settings:
        base = dict(
            quick=True,
            batch=4,
            sizes=(32,),
            overhead_size=32,
            overhead_warmup=1,
            overhead_repeats=3,
            throughput_warmup=1,
            throughput_repeats=2,
            sample_size=32,
            sample_ns=(1, 4),
            sample_warmup=1,
            sample_repeats=2,
            data_sizes=(32,),
            data_wait_batches=4,
            scaling_fractions=(0.5, 1.0),
            scaling_size=32,
            scaling_sizes=(32, 64),
            scaling_size_slices=8,
            synthetic_patients=4,
            options_repeats=2,
            in_process=True,
        )
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def block(self) -> int:
        """Steps per timed call (``step_block``, resolved for the device)."""
        return self.step_block or (20 if torch.device(self.device).type == "cuda" else 1)


def sync(device: torch.device | str) -> None:
    """Wait for the device to finish (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleave(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, device) -> dict[str, list[float]]:
    """Time every variant ``repeats`` times, interleaved (order rotated every round),
    after ``warmup`` unrecorded rounds. Returns ``{name: [seconds per round]}``."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(timed(fns[n], device))
    return out


def repeat(fn: Callable[[], object], n: int) -> Callable[[], object]:
    """``fn`` called ``n`` times in a row, with no sync between the calls."""
    if n == 1:
        return fn

    def run():
        for _ in range(n):
            fn()

    return run


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios ``num[i] / den[i]`` (the rounds were interleaved)."""
    return median([a / b for a, b in zip(num, den)])


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: it survives ``execve``, so a worker started by a
    big parent process reports the parent's size (measured: 957 MiB for every
    64x64 worker, whatever the model)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def environment(device: str) -> dict:
    """What a reader needs to judge a figure: versions, threads, CPUs, load, device."""
    import pyro

    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        env["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def run_worker(spec: dict, *, in_process: bool = False, timeout: float = 1800) -> dict:
    """Run ``python -m benchmarks.worker SPEC`` in a fresh process (so its peak
    memory is its own) and return the JSON it prints on its last line; with
    ``in_process`` call the worker here instead. A failure comes back as
    ``{"error": "..."}`` so that one bad configuration does not stop the suite."""
    if in_process:
        from benchmarks import worker

        try:
            return worker.KINDS[spec["kind"]](dict(spec))
        except Exception as e:  # noqa: BLE001 - reported in the results, as a subprocess failure is
            return {"error": f"{type(e).__name__}: {e}", **spec}
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"worker exited {proc.returncode}: {tail[0]}", **spec}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_batch(batch: int, size: int, *, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch: images ``(B, 3, S, S)`` uniform in [0, 1], masks ``(B, 1, S, S)``
    with about 10 % lesion pixels. Step time does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.9).float()
    return image.to(device), mask.to(device)
