"""The benchmark scripts run (dry run on the CPU; the GPU figures come from a machine with a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def torch_globals():
    """The script sets torch's thread count and TF32 flags, as a script may; give
    them back, or later tests run with other float reduction orders."""
    import torch

    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.set_num_threads(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def test_gpu_bf16_script_dry_run_on_cpu(tmp_path, monkeypatch, torch_globals):
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["gpu_ddp_bf16.py", "--device", "cpu", "--dry-run", "--json", str(out)])
    _load("gpu_ddp_bf16").main()
    rows = json.loads(out.read_text())
    assert [(r["model"], r["precision"]) for r in rows] == [
        (m, p) for m in ("unet", "prob_unet", "hprob_unet") for p in ("fp32", "fp32-notf32", "bf16")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["steps_applied"] == "1/1"
        if r["precision"] == "bf16":  # autocast took effect, and only rounds
            assert 0 < r["loss_rel_diff"] < 0.05, r
        else:
            assert r["loss_rel_diff"] == 0
    assert all(r["speedup_vs_fp32"] > 0 for r in rows)


@pytest.mark.slow
def test_ddp_cpu_benchmark_runs_one_and_two_processes(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH / "ddp_cpu.py"), "--nproc", "1,2", "--image-size", "32", "--widths", "8,16,32,64",
           "--batch-size", "4", "--steps", "1", "--blocks", "1", "--warmup", "0", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(x["processes"], x["batch_per_process"]) for x in rows] == [(1, 4), (2, 2)]
    assert rows[0]["comm_share"] == 0 and 0 <= rows[1]["comm_share"] < 1
    assert "images/s" in r.stdout
