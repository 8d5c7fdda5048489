"""The benchmark suite (``python -m benchmarks.run``) in its ``--quick`` mode, so it cannot rot,
and the pieces its figures rest on: the hand-written twins compute Pyro's loss, the
timing helpers interleave, a worker runs in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ lives beside the package, not inside it

from benchmarks import common, plain  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402
from pyroseg.models import build_model  # noqa: E402


@pytest.fixture(autouse=True)
def torch_globals():
    """The suite and the scripts set torch's thread count (an in-process worker, ``--threads``)
    and TF32 flags, as a script may; give them back, or later tests run with other float
    reduction orders (the learning tests' budgets were tuned with conftest's thread count)."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.set_num_threads(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


@pytest.mark.parametrize("name", plain.PLAIN)
def test_hand_written_twin_computes_pyros_loss(name):
    """The yardstick is only fair if it computes the same loss as the Pyro model."""
    model = build_model(name, image_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image, mask = common.random_batch(3, 32)
    assert plain.check_same_loss(model, image, mask) < 1e-5


def test_interleave_rotates_and_medians():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = common.interleave(fns, warmup=1, repeats=3, device="cpu")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert common.median_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def test_worker_runs_in_a_fresh_process():
    spec = {"kind": "train", "model": "plain_unet", "size": 32, "batch": 2, "warmup": 0, "repeats": 1, "threads": 1}
    r = common.run_worker(spec)
    assert "error" not in r, r
    assert r["images_per_s"] > 0 and r["peak_rss_mib"] >= r["baseline_rss_mib"] > 0
    bad = common.run_worker({**spec, "model": "nope"}, in_process=True)  # the same error path, without a 2nd start-up
    assert "error" in bad and "nope" in bad["error"]


def test_quick_suite_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.delenv("PYROSEG_LGG_DIR", raising=False)
    out = tmp_path / "bench"
    doc = bench_run.main(["--quick", "--device", "cpu", "--out", str(out), "--models", "unet,prob_unet,hprob_unet"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["items"].keys() == doc["items"].keys() == set(bench_run.ITEMS)
    over = {(r["model"], r["variant"]): r for r in saved["items"]["overhead"]["rows"]}
    assert over[("unet", "plain")]["ratio_vs_plain"] == 1.0
    assert over[("prob_unet", "trainer")]["median_ms"] > 0
    assert over[("prob_unet", "svi")]["loss_rel_diff_plain_vs_pyro"] < 1e-5
    thr = saved["items"]["throughput"]["rows"]
    # the plain step, the models, and pyroseg's earlier host-sync step for the overhead models
    assert [r["model"] for r in thr] == ["plain_unet", "unet", "prob_unet", "hprob_unet", "unet@host_sync", "prob_unet@host_sync"]
    assert all(r["images_per_s"] > 0 for r in thr)
    samp = {r["model"]: r for r in saved["items"]["sampling"]["rows"]}
    assert samp["hprob_unet"]["ms_n4"] > 0 and "limit" in samp["prob_unet"]
    data = saved["items"]["data"]
    assert "PYROSEG_LGG_DIR" in data["note"] and 0 <= data["wait"]["data_wait_share"] < 1
    scal = saved["items"]["scaling"]
    assert [r["slices"] for r in scal["by_slices"]][0] < [r["slices"] for r in scal["by_slices"]][-1]
    assert all("epoch_s" in r for r in scal["by_size"])
    assert saved["items"]["options"]["rows"]
    md = (out / "summary.md").read_text()
    for heading in ("1. Pyro overhead", "2. Training throughput", "3. Sampling cost", "4. Data", "5. Scaling", "6. Speed options"):
        assert heading in md
    assert "Quick mode" in md
    # refreshing one item keeps the others
    bench_run.main(["--quick", "--device", "cpu", "--out", str(out), "--items", "data", "--merge"])
    merged = json.loads((out / "results.json").read_text())
    assert merged["items"].keys() == saved["items"].keys()
    assert merged["items"]["overhead"] == saved["items"]["overhead"]
    assert merged["items"]["data"]["command"].endswith("--items data --merge")
    assert "Items not re-run come from" in (out / "summary.md").read_text()


def test_bad_item_and_device_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--items nope"):
        bench_run.main(["--quick", "--items", "nope", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            bench_run.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])


# ------------------------------------------------- the data-parallel / GPU scripts

BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bf16_script_dry_run_on_cpu(tmp_path, monkeypatch):
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
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(x["processes"], x["batch_per_process"]) for x in rows] == [(1, 4), (2, 2)]
    assert rows[0]["comm_share"] == 0 and 0 <= rows[1]["comm_share"] < 1
    assert "images/s" in r.stdout


def test_gpu_sync_script_runs_its_code_path_on_cpu(tmp_path, monkeypatch):
    """benchmarks/gpu_sync_graphs.py sync on CPU: every variant runs (there is nothing to count)."""
    out = tmp_path / "sync.json"
    monkeypatch.setattr(sys, "argv", ["gpu_sync_graphs.py", "sync", "--device", "cpu", "--models", "unet", "--size", "32",
                                      "--batch", "2", "--steps", "1", "--json", str(out)])
    _load("gpu_sync_graphs").main()
    rows = json.loads(out.read_text())["sync"]["rows"]
    assert [r["variant"].split(" (")[0].split(",")[0] for r in rows] == ["trainer", "trainer", "DeviceBatches", "DataLoader + .to(device)"]
    assert all(r["syncs"] is None for r in rows)
    assert [r["check_every"] for r in rows[:2]] == [1, 1]  # the CPU default


def test_recipe_benchmark_trains_scores_and_tabulates(tmp_path):
    """benchmarks/recipe.py: trains each MODEL:EPOCHS with the recipe, scores best.pt on the test
    patients, and tabulates; --table-only then trains nothing and gives the same figures."""
    from benchmarks import recipe

    args = ["--data", "synthetic", "--image-size", "32", "--models", "unet:2", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--seeds", "0,1"]
    recipe.main(args)
    doc = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert [(r["model"], r["epochs"], r["seed"]) for r in doc["rows"]] == [("unet", 2, 0), ("unet", 2, 1)]
    for r in doc["rows"]:
        assert (r["augment"], r["lr_schedule"]) == ("standard", "cosine")
        assert r["checkpoint"].startswith("best.pt") and 0 <= r["dice_tumour"] <= 1 and r["minutes"] > 0
    table = (tmp_path / "out" / "recipe.md").read_text()
    assert "| unet | 2 | 0, 1 |" in table
    mtime = (tmp_path / "runs" / "unet_e2_s0" / "checkpoint.pt").stat().st_mtime_ns
    recipe.main([*args, "--table-only"])
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["rows"] == doc["rows"]
    assert (tmp_path / "runs" / "unet_e2_s0" / "checkpoint.pt").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit):
        recipe.main([*args[:4], "--models", "unet", *args[6:]])
