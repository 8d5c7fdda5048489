"""Segmentation metrics as pure functions on tensors.

Shapes: ``pred`` and ``target`` are binary masks ``(N, H, W)`` (any trailing
shape works: everything after the first dim is one slice); ``prob`` a
probability map of the same shape. Per-slice functions return ``(N,)``.

Empty-mask conventions (the seed report's, and the usual ones):

* Dice and IoU of an empty prediction on an empty target are ``empty_score``
  (1 by default: nothing to find, nothing found);
* an empty prediction on a non-empty target, or a non-empty prediction on an
  empty target, scores 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "dice",
    "iou",
    "binary_cross_entropy",
    "volume_dice",
    "segmentation_report",
]

_EPS = 1e-7


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def dice(pred: torch.Tensor, target: torch.Tensor, *, empty_score: float = 1.0) -> torch.Tensor:
    """Per-slice Dice ``2|P n T| / (|P| + |T|)``, ``(N,)``."""
    p, t = _flat(pred), _flat(target)
    inter = (p * t).sum(1)
    total = p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(_EPS), torch.full_like(total, empty_score))


def iou(pred: torch.Tensor, target: torch.Tensor, *, empty_score: float = 1.0) -> torch.Tensor:
    """Per-slice intersection over union ``|P n T| / |P u T|``, ``(N,)``."""
    p, t = _flat(pred), _flat(target)
    inter = (p * t).sum(1)
    union = p.sum(1) + t.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(_EPS), torch.full_like(union, empty_score))


def binary_cross_entropy(prob: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Per-slice mean per-pixel binary cross-entropy (nats), ``(N,)``.

    Probabilities are clipped to ``[eps, 1 - eps]`` so that a confident mistake
    costs ``-log(eps)`` (13.8 nats) rather than infinity.
    """
    p = _flat(prob).clamp(eps, 1 - eps)
    t = _flat(target)
    return -(t * p.log() + (1 - t) * (1 - p).log()).mean(1)


def volume_dice(pred: torch.Tensor, target: torch.Tensor, groups: Sequence, *, empty_score: float = 1.0) -> dict:
    """3-D Dice per group (patient): all slices of a patient pooled into one volume.

    ``groups``: ``(N,)`` patient id of each slice. Returns ``{patient: dice}``.
    """
    groups = np.asarray(groups)
    p, t = _flat(pred), _flat(target)
    out = {}
    for g in dict.fromkeys(groups.tolist()):
        sel = torch.as_tensor(groups == g)
        out[g] = float(dice(p[sel].reshape(1, -1), t[sel].reshape(1, -1), empty_score=empty_score)[0])
    return out


def segmentation_report(prob: torch.Tensor, target: torch.Tensor, groups: Sequence, *, threshold: float = 0.5) -> dict:
    """The summary ``pyroseg evaluate`` prints, from mean probabilities ``prob: (N, H, W)``.

    Keys: ``dice_all`` (mean per-slice Dice, empty-on-empty = 1, the seed
    report's metric), ``dice_tumour`` and ``iou_tumour`` (mean over slices whose
    true mask is non-empty), ``dice_volume`` (per-patient 3-D Dice, mean over
    patients), ``bce`` (mean per-pixel cross-entropy of ``prob``),
    ``false_positive_slices`` (fraction of empty slices given a non-empty mask),
    ``empty_slices`` (fraction of slices with an empty true mask: the
    ``dice_all`` of predicting nothing anywhere), ``n_patients``, ``n_slices``.
    """
    pred = prob >= threshold
    target = target.bool()
    n = prob.shape[0]
    has_tumour = _flat(target).sum(1) > 0
    d = dice(pred, target)
    j = iou(pred, target)
    pred_any = _flat(pred).sum(1) > 0
    empty = ~has_tumour
    vol = volume_dice(pred, target, groups)

    def mean_or_nan(x: torch.Tensor) -> float:
        return float(x.float().mean()) if x.numel() else float("nan")

    return {
        "dice_all": mean_or_nan(d),
        "dice_tumour": mean_or_nan(d[has_tumour]),
        "dice_volume": float(np.mean(list(vol.values()))) if vol else float("nan"),
        "iou_tumour": mean_or_nan(j[has_tumour]),
        "bce": mean_or_nan(binary_cross_entropy(prob, target)),
        "false_positive_slices": mean_or_nan(pred_any[empty]),
        "empty_slices": mean_or_nan(empty),
        "n_patients": len(vol),
        "n_slices": int(n),
    }
