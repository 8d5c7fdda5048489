"""Which device a command runs on: one function every layer may import.

It lives below :mod:`pyroseg.train`, :mod:`pyroseg.evaluate`,
:mod:`pyroseg.collapse` and :mod:`pyroseg.sampling` so that none of them has to
import another upward for it.
"""

from __future__ import annotations

import torch

from pyroseg.errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu or --device auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu or cuda") from None
