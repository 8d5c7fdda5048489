"""Shared fixtures. Real-data tests read the LGG development copy from
``PYROSEG_LGG_DIR`` and skip, saying why, when it is not set."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Every test starts with an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def lgg_dir() -> Path:
    path = os.environ.get("PYROSEG_LGG_DIR")
    if not path:
        pytest.skip("PYROSEG_LGG_DIR not set: point it at the LGG kaggle_3m folder to run the real-data tests")
    p = Path(path)
    if not p.is_dir():
        pytest.skip(f"PYROSEG_LGG_DIR={path} does not exist")
    return p


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private cache folder, so tests never touch the user's cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("PYROSEG_CACHE_DIR", str(d))
    return d
