"""The examples run (through the public API only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"dice_all"' in res.stdout and (out / "example_probs.npy").is_file()
