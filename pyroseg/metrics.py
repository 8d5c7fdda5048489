"""Segmentation metrics as pure functions on tensors.

Shapes: ``pred`` and ``target`` are binary masks ``(N, H, W)`` (any trailing
shape works: everything after the first dim is one slice); ``prob`` a
probability map of the same shape. Per-slice functions return ``(N,)``.

Metrics of a *distribution* of masks (:func:`ged`, :func:`hm_iou`,
:func:`sample_diversity`) take sets of masks per image: ``samples``
``(B, S, H, W)`` (S masks drawn from the model) and ``annotations``
``(B, A, H, W)`` (A annotators), binary, and return ``(B,)``. Their distance is
``d = 1 - IoU`` with ``d(empty, empty) = 0``. :func:`ece` and
:func:`reliability_curve` judge the per-pixel mean probability against the
fraction of annotators who mark the pixel; :class:`ReliabilityAccumulator` and
:class:`DistributionAccumulator` collect them batch by batch.

Multi-rater data may have a different number of raters per image: the
functions that take ``annotations`` also take ``counts`` ``(B,)`` (how many of
the ``A`` masks of each image are real; the rest are padding and are never
read), ``None`` meaning all ``A``. :func:`qubiq_score`, :func:`rater_mean`,
:func:`majority_vote` and :func:`dice_per_rater` judge a point prediction
against every rater.

Empty-mask conventions (the seed report's, and the usual ones):

* Dice and IoU of an empty prediction on an empty target are ``empty_score``
  (1 by default: nothing to find, nothing found);
* an empty prediction on a non-empty target, or a non-empty prediction on an
  empty target, scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "dice",
    "iou",
    "binary_cross_entropy",
    "volume_dice",
    "segmentation_report",
    "pairwise_iou",
    "ged",
    "ged_terms",
    "hm_iou",
    "sample_diversity",
    "reliability_curve",
    "ece",
    "ReliabilityAccumulator",
    "DistributionAccumulator",
    "ECE_BINS",
    "QUBIQ_THRESHOLDS",
    "rater_mean",
    "majority_vote",
    "dice_per_rater",
    "qubiq_score",
]

#: The thresholds of the QUBIQ challenge's score: 0.1, 0.2, ..., 0.9.
QUBIQ_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))

#: Equal-width bins on [0, 1] of :func:`ece` and :func:`reliability_curve`.
ECE_BINS = 10

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


# ---------------------------------------------------------------------------------------
# distributions of masks: GED, Hungarian-matched IoU, diversity


def pairwise_iou(a: torch.Tensor, b: torch.Tensor, *, empty_score: float = 1.0) -> torch.Tensor:
    """IoU of every mask of ``a`` with every mask of ``b``.

    ``a``: ``(..., S, H, W)``, ``b``: ``(..., A, H, W)`` binary (bool, 0/1 int or
    float; the leading dims must match). Returns ``(..., S, A)`` float32; two
    empty masks score ``empty_score`` (1: they agree).
    """
    if a.shape[:-3] != b.shape[:-3] or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"mask sets must share leading and spatial dims; got {tuple(a.shape)} and {tuple(b.shape)}")
    fa = a.flatten(-2).float()  # (..., S, P)
    fb = b.flatten(-2).float()  # (..., A, P)
    inter = fa @ fb.transpose(-1, -2)  # (..., S, A), exact: counts < 2**24
    union = fa.sum(-1)[..., :, None] + fb.sum(-1)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.full_like(union, empty_score))


def _self_mean(d: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Mean of a ``(..., n, n)`` distance matrix with a zero diagonal: over all
    ``n**2`` ordered pairs (``unbiased=False``) or over the ``n (n - 1)`` pairs of
    distinct members (``unbiased=True``; 0 when ``n = 1``). ``(...)``."""
    n = d.shape[-1]
    total = d.sum((-2, -1))
    if unbiased:
        return total / (n * (n - 1)) if n > 1 else torch.zeros_like(total)
    return total / n**2


def _ragged(fn, samples: torch.Tensor, annotations: torch.Tensor, counts: torch.Tensor | None):
    """``fn(samples, annotations)`` per image over each image's own ``counts[b]``
    annotations when they differ from ``A``; one batched call otherwise. ``(B,)``."""
    a = annotations.shape[-3]
    if counts is None or bool((torch.as_tensor(counts) == a).all()):
        return fn(samples, annotations)
    counts = torch.as_tensor(counts).tolist()
    return torch.cat([fn(samples[b : b + 1], annotations[b : b + 1, : int(n)]) for b, n in enumerate(counts)])


def ged_terms(samples: torch.Tensor, annotations: torch.Tensor, *, unbiased: bool = False) -> dict[str, torch.Tensor]:
    """The three expectations of the generalised energy distance, each ``(B,)``.

    ``"cross"`` = E[d(S, Y)] over all ``S x A`` pairs; ``"samples"`` = E[d(S, S')]
    and ``"annotations"`` = E[d(Y, Y')] within each set (see :func:`ged` for
    ``unbiased``). ``samples``: ``(B, S, H, W)``, ``annotations``:
    ``(B, A, H, W)``, binary.
    """
    return {
        "cross": (1 - pairwise_iou(samples, annotations)).mean((-2, -1)),
        "samples": _self_mean(1 - pairwise_iou(samples, samples), unbiased),
        "annotations": _self_mean(1 - pairwise_iou(annotations, annotations), unbiased),
    }


def ged(samples: torch.Tensor, annotations: torch.Tensor, *, unbiased: bool = False,
        counts: torch.Tensor | None = None) -> torch.Tensor:
    """Squared generalised energy distance per image, ``(B,)``.

    ``D^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d = 1 - IoU``
    (``d(empty, empty) = 0``), ``S, S'`` masks of ``samples: (B, S, H, W)`` and
    ``Y, Y'`` of ``annotations: (B, A, H, W)``.

    The within-set expectations, by default (``unbiased=False``), average over
    all ordered pairs *including* a mask with itself (``d = 0``): the energy
    distance between the two empirical distributions, as in the PHiSeg and
    Probabilistic U-Net evaluations. It is 0 when the two sets are identical
    and never negative, but it is biased upward by ``E[d(S, S')] / S +
    E[d(Y, Y')] / A`` in expectation: more samples lower it for a diverse model,
    and a model with identical samples pays nothing for its ``1/S`` term.
    ``unbiased=True`` averages over distinct pairs only (the U-statistic):
    its expectation is the population ``D^2`` whatever ``S`` and ``A`` (0 for a
    model that samples the annotators' distribution), but one draw can be
    negative, and two identical sets of ``n`` distinct masks score below 0. A set
    of one mask has no distinct pair: its within-set term is 0 either way (so on
    one-annotator data the last term is 0).
    ``counts``: ``(B,)`` real annotations per image (the rest padding); None: all ``A``.
    """
    def one(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        t = ged_terms(s, a, unbiased=unbiased)
        return 2 * t["cross"] - t["samples"] - t["annotations"]

    return _ragged(one, samples, annotations, counts)


def sample_diversity(samples: torch.Tensor) -> torch.Tensor:
    """Mean ``d(S, S') = 1 - IoU`` over distinct pairs of samples, ``(B,)``, in [0, 1].

    ``samples``: ``(B, S, H, W)`` binary. 0 when every sample is the same mask
    (or ``S = 1``).
    """
    return _self_mean(1 - pairwise_iou(samples, samples), unbiased=True)


def hm_iou(samples: torch.Tensor, annotations: torch.Tensor, *, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Hungarian-matched IoU between the sample set and the annotation set, ``(B,)``.

    The smaller set is replicated to the size ``n = max(S, A)`` of the larger
    (member ``i`` of the copy is member ``i mod m``: with 16 samples and 4
    annotators, each annotator 4 times), the one-to-one matching that maximises
    the total IoU is found with :func:`scipy.optimize.linear_sum_assignment`,
    and the mean IoU of the matched pairs is returned (``IoU(empty, empty) = 1``).
    When ``m`` does not divide ``n`` the first ``n mod m`` members of the smaller
    set count once more than the rest. 1 when the sets are identical.
    ``samples``: ``(B, S, H, W)``, ``annotations``: ``(B, A, H, W)``, binary;
    ``counts``: ``(B,)`` real annotations per image (the rest padding), None: all.
    """
    if counts is not None and not bool((torch.as_tensor(counts) == annotations.shape[-3]).all()):
        return _ragged(hm_iou, samples, annotations, counts)
    iou_sa = pairwise_iou(samples, annotations)  # (B, S, A)
    n_s, n_a = iou_sa.shape[-2:]
    n = max(n_s, n_a)
    rows, cols = torch.arange(n) % n_s, torch.arange(n) % n_a
    scores = iou_sa[:, rows][:, :, cols].cpu().double().numpy()  # (B, n, n)
    out = np.empty(len(scores))
    for b, m in enumerate(scores):
        r, c = linear_sum_assignment(m, maximize=True)
        out[b] = m[r, c].mean()
    return torch.from_numpy(out).float()


class DistributionAccumulator:
    """Per-image GED (both estimators), matched IoU and diversity, batch by batch.

    ``update(samples, annotations)`` with ``(B, S, H, W)`` and ``(B, A, H, W)``
    binary masks; ``per_image()`` gives ``{name: (N,) ndarray}`` over all batches
    so far, ``aggregate()`` their means: ``ged``, ``ged_unbiased``, ``hm_iou``,
    ``sample_diversity``, ``annotator_diversity`` (the same of the annotations).
    """

    KEYS = ("ged", "ged_unbiased", "hm_iou", "sample_diversity", "annotator_diversity")

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in self.KEYS}

    def update(self, samples: torch.Tensor, annotations: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """``counts``: ``(B,)`` real annotations per image (the rest padding); None: all ``A``."""
        a = annotations.shape[-3]
        if counts is not None and not bool((torch.as_tensor(counts) == a).all()):
            for b, n in enumerate(torch.as_tensor(counts).tolist()):
                self.update(samples[b : b + 1], annotations[b : b + 1, : int(n)])
            return
        d_sa = 1 - pairwise_iou(samples, annotations)  # (B, S, A)
        d_ss = 1 - pairwise_iou(samples, samples)  # (B, S, S)
        d_aa = 1 - pairwise_iou(annotations, annotations)  # (B, A, A)
        cross = d_sa.mean((-2, -1))
        values = {
            "ged": 2 * cross - _self_mean(d_ss, False) - _self_mean(d_aa, False),
            "ged_unbiased": 2 * cross - _self_mean(d_ss, True) - _self_mean(d_aa, True),
            "hm_iou": hm_iou(samples, annotations),
            "sample_diversity": _self_mean(d_ss, True),
            "annotator_diversity": _self_mean(d_aa, True),
        }
        for k, v in values.items():
            self._parts[k].append(v.float().cpu().numpy())

    def per_image(self) -> dict[str, np.ndarray]:
        return {k: (np.concatenate(v) if v else np.zeros(0, np.float32)) for k, v in self._parts.items()}

    def aggregate(self) -> dict[str, float]:
        return {k: float(v.mean()) if len(v) else float("nan") for k, v in self.per_image().items()}


# ---------------------------------------------------------------------------------------
# calibration


class ReliabilityAccumulator:
    """Counts of a reliability diagram, pixel by pixel, batch by batch.

    Pixels are binned by predicted lesion probability into ``n_bins``
    equal-width bins on [0, 1] (bin ``k`` is ``[k/n, (k+1)/n)``, the last one
    closed); per bin it keeps the pixel count, the sum of predicted
    probabilities and the sum of targets (float64, so millions of pixels add up
    exactly enough). A target may be soft: the fraction of annotators who mark
    the pixel.
    """

    def __init__(self, n_bins: int = ECE_BINS):
        if n_bins < 1:
            raise ValueError(f"n_bins {n_bins}: expected at least 1")
        self.n_bins = n_bins
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.sum_prob = torch.zeros(n_bins, dtype=torch.float64)
        self.sum_target = torch.zeros(n_bins, dtype=torch.float64)

    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        """``prob`` and ``target``: any shape, the same, values in [0, 1]."""
        if prob.shape != target.shape:
            raise ValueError(f"prob {tuple(prob.shape)} and target {tuple(target.shape)} differ in shape")
        p = prob.detach().reshape(-1).double().cpu()
        t = target.detach().reshape(-1).double().cpu()
        idx = (p * self.n_bins).long().clamp_(0, self.n_bins - 1)
        self.count += torch.bincount(idx, minlength=self.n_bins).double()
        self.sum_prob += torch.bincount(idx, weights=p, minlength=self.n_bins)
        self.sum_target += torch.bincount(idx, weights=t, minlength=self.n_bins)

    def curve(self) -> dict[str, list]:
        """``edges`` (n_bins + 1), and per bin ``count``, ``confidence`` (mean
        predicted probability) and ``frequency`` (mean target): NaN in empty bins."""
        n = self.count
        nan = torch.full_like(n, float("nan"))
        return {
            "edges": torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64).tolist(),
            "count": [int(c) for c in n.tolist()],
            "confidence": torch.where(n > 0, self.sum_prob / n.clamp_min(1), nan).tolist(),
            "frequency": torch.where(n > 0, self.sum_target / n.clamp_min(1), nan).tolist(),
        }

    def ece(self) -> float:
        """``sum_k (n_k / N) |confidence_k - frequency_k|`` (NaN with no pixels)."""
        total = float(self.count.sum())
        if total == 0:
            return float("nan")
        return float((self.sum_prob - self.sum_target).abs().sum() / total)


def reliability_curve(prob: torch.Tensor, target: torch.Tensor, *, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Reliability-diagram data of ``prob`` against ``target`` (same shape, in [0, 1]).

    See :meth:`ReliabilityAccumulator.curve`: ``edges`` ``(n_bins + 1,)``,
    ``count``, ``confidence``, ``frequency`` ``(n_bins,)``.
    """
    acc = ReliabilityAccumulator(n_bins)
    acc.update(prob, target)
    return acc.curve()


def ece(prob: torch.Tensor, target: torch.Tensor, *, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of lesion probabilities, a float.

    Every pixel of ``prob`` (any shape) is put in one of ``n_bins`` equal-width
    bins on [0, 1] by its predicted lesion probability; the ECE is
    ``sum_k (n_k / N) |mean prob_k - mean target_k|`` over the bins (``n_k``
    pixels in bin ``k``, ``N`` in all). ``target`` has the shape of ``prob``, 0/1
    or soft (the fraction of annotators who mark the pixel). This is the
    calibration of the lesion probability itself (both classes at once), not of
    the top-label confidence.
    """
    acc = ReliabilityAccumulator(n_bins)
    acc.update(prob, target)
    return acc.ece()


# ---------------------------------------------------------------------------------------
# a point prediction against every rater: rater mean, majority, per-rater Dice, QUBIQ score


def _counts(raters: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` float counts; ``None``: ``A`` for every image."""
    if counts is None:
        return torch.full((raters.shape[0],), float(raters.shape[1]), device=raters.device)
    return torch.as_tensor(counts, device=raters.device).float()


def rater_mean(raters: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel fraction of raters who mark the pixel, ``(B, H, W)`` float in [0, 1].

    ``raters``: ``(B, A, H, W)`` binary, slots past ``counts[b]`` empty (padding).
    """
    n = _counts(raters, counts)
    return raters.float().sum(1) / n.view(-1, *([1] * (raters.dim() - 2)))


def majority_vote(raters: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The majority mask ``(B, H, W)`` bool: pixels that at least half of the raters mark.

    A tie (2 of 4) counts as lesion, as the 50 % consensus of the LIDC tools
    (pylidc's ``consensus(clevel=0.5)``) and our mask resize do.
    """
    return rater_mean(raters, counts) >= 0.5


def dice_per_rater(pred: torch.Tensor, raters: torch.Tensor, counts: torch.Tensor | None = None,
                   *, empty_score: float = 1.0) -> torch.Tensor:
    """Dice of a binary ``pred`` ``(B, H, W)`` against each rater of ``raters`` ``(B, A, H, W)``.

    Returns ``(B, A)`` float; NaN in the padded slots (``a >= counts[b]``), so
    ``nanmean`` over raters averages each image's own raters only.
    """
    b, a = raters.shape[:2]
    d = dice(pred[:, None].expand_as(raters).reshape(b * a, -1), raters.reshape(b * a, -1), empty_score=empty_score)
    d = d.view(b, a)
    valid = torch.arange(a, device=raters.device)[None, :] < _counts(raters, counts)[:, None]
    return torch.where(valid, d, torch.full_like(d, float("nan")))


def qubiq_score(prob: torch.Tensor, raters: torch.Tensor, counts: torch.Tensor | None = None,
                *, thresholds: Sequence[float] = QUBIQ_THRESHOLDS) -> torch.Tensor:
    """The QUBIQ challenge's score per image, ``(B,)`` in [0, 1].

    The raters are averaged into a continuous map ``m = rater_mean(raters)``;
    ``m`` and the prediction ``prob`` ``(B, H, W)`` (the model's mean
    probability) are each thresholded at every ``t`` of ``thresholds`` (strictly
    above ``t``: with 7 raters ``m`` never equals a threshold; with 4, ``m = 0.5``
    is not above 0.5) and the Dice of the two masks is averaged over the
    thresholds; two empty masks score 1.
    """
    m = rater_mean(raters, counts)
    scores = [dice(prob > t, m > t, empty_score=1.0) for t in thresholds]
    return torch.stack(scores).mean(0)
