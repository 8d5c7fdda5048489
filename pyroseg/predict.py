"""Inference without training: predictions over a dataset and the ELBO's terms.

Everything here runs under ``torch.inference_mode()`` with the model in eval
mode: no gradients, no augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from torch.utils.data import DataLoader

from pyroseg.config import POINTS
from pyroseg.data.core import SegData, SegDataset, collate_batch
from pyroseg.metrics import DistributionAccumulator, dice
from pyroseg.models.base import SegModel
from pyroseg.objective import site_kl

__all__ = ["elbo_terms", "Predictions", "predict_dataset", "POINT_PREDICTIONS", "resolve_point"]

#: The point predictions :func:`predict_dataset` can make (``point=``,
#: :data:`pyroseg.config.POINTS`), what each puts in :attr:`Predictions.mean`;
#: thresholded at 0.5, each is the point mask.
POINT_PREDICTIONS = {
    "auto": "the model's own (SegModel.point_prediction): mean-z for ssn, as its reference predicts, else mean",
    "mean": "the mean of the samples' mask probabilities",
    "majority": "the share of the thresholded samples that mark the pixel (at 0.5: at least half of them)",
    "mean-z": "the mask probability with every latent at its test-time mean (SegModel.predict_at_mean)",
}
assert tuple(POINT_PREDICTIONS) == POINTS


def resolve_point(model: SegModel, point: str = "auto") -> str:
    """``point``, or for ``"auto"`` the model's own :attr:`~pyroseg.models.base.SegModel.point_prediction`."""
    return model.point_prediction if point == "auto" else point


def elbo_terms(model: SegModel, image: torch.Tensor, mask: torch.Tensor, *, posterior_dice: bool = False
               ) -> dict[str, torch.Tensor]:
    """The terms of the negative ELBO per image, with beta = 1 and no GECO scale.

    Traces the guide, replays the model on its latents, and returns ``(B,)``
    tensors: ``"recon"`` = ``-log p(y | x, z)`` (nats per image, summed over
    pixels), ``"kl_<site>"`` = ``KL(q || p)`` of each latent site (analytic,
    given the sites sampled before it; :func:`~pyroseg.objective.site_kl`, as the training
    objective computes it), and ``"loss"`` = ``recon + sum KL``, the
    negative ELBO. This is what :class:`~pyro.infer.TraceMeanField_ELBO`
    estimates, split by site so that a collapsed site (KL ~ 0) is visible.

    ``posterior_dice``: also ``"dice_posterior"``, the Dice against ``mask`` of the
    mask site's mean (thresholded at 0.5) under that draw of the guide: for a model whose
    guide is given the mask (the Probabilistic U-Nets, PHiSeg), how well it segments when
    its latents are *told* the answer. Far above the Dice of its test-time prediction,
    the latents carry what the prior cannot infer from the image.
    """
    guide_trace = poutine.trace(model.guide).get_trace(image, mask)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(image, mask)
    site = model_trace.nodes["mask"]
    terms = {"recon": -site["fn"].log_prob(site["value"])}  # (B,)
    total = terms["recon"]
    for name in model.latent_sites:
        kl = site_kl(model_trace.nodes[name], guide_trace.nodes[name])  # (B,); ssn: 0 by construction
        terms[f"kl_{name}"] = kl
        total = total + kl
    terms["loss"] = total
    if posterior_dice:
        terms["dice_posterior"] = dice(site["fn"].mean >= 0.5, mask >= 0.5)  # (B,)
    return terms


@dataclass
class Predictions:
    """Per-slice outputs over a dataset, in its order.

    ``mean``: ``(N, H, W)`` float32 point probability: by default the mean mask
    probability over the samples (:data:`POINT_PREDICTIONS` for the others);
    ``samples``: ``(N, S, H, W)`` uint8 thresholded samples (only when kept);
    ``terms``: ``{"recon": (N,), "kl_z": (N,), "loss": (N,)}`` (only when asked; with
    ``posterior_dice``, for a model whose guide is given the mask, ``"dice_posterior"``);
    ``distribution``: ``{"ged": (N,), "ged_unbiased", "hm_iou", "sample_diversity",
    "annotator_diversity"}`` of the thresholded samples against every annotator
    (only when asked; see :class:`~pyroseg.metrics.DistributionAccumulator`).
    """

    mean: np.ndarray
    samples: np.ndarray | None
    terms: dict[str, np.ndarray]
    distribution: dict[str, np.ndarray] = field(default_factory=dict)


@torch.inference_mode()
def predict_dataset(
    model: SegModel,
    data: SegData,
    *,
    num_samples: int = 16,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    with_terms: bool = True,
    keep_samples: bool = False,
    distribution: bool = False,
    threshold: float = 0.5,
    point: str = "auto",
    posterior_dice: bool = False,
) -> Predictions:
    """Run ``model.sample`` over every slice of ``data`` (first annotator's mask for the ELBO terms).

    A model without a latent draws one sample (all its samples are that one).
    ``distribution``: also score, batch by batch, the samples thresholded at
    ``threshold`` against all ``A`` annotator masks of ``data`` (GED, matched
    IoU, diversity: :attr:`Predictions.distribution`), without keeping them;
    each slice against its own ``data.rater_counts[i]`` raters only.
    ``point``: what :attr:`Predictions.mean` holds, one of :data:`POINT_PREDICTIONS`.
    ``posterior_dice``: with the terms, also ``"dice_posterior"`` for a model whose guide is
    given the mask (:func:`elbo_terms`).
    """
    if point not in POINT_PREDICTIONS:
        raise ValueError(f"point: expected one of {', '.join(POINT_PREDICTIONS)}, got {point!r}")
    point = resolve_point(model, point)
    was_training = model.training
    model.eval()
    loader = DataLoader(SegDataset(data), batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    n_draw = model.num_draws(num_samples)
    means, samples, terms = [], [], {}
    dist = DistributionAccumulator() if distribution else None
    try:
        for batch in loader:
            image = batch["image"].to(device)
            probs = model.sample(image, n_draw)  # (S, B, 1, H, W)
            if keep_samples or dist is not None or point == "majority":
                binary = (probs[:, :, 0] >= threshold).transpose(0, 1)  # (B, S, H, W) bool
            if point == "mean":
                means.append(probs.mean(0)[:, 0].float().cpu())
            elif point == "majority":
                means.append(binary.float().mean(1).cpu())  # (B, H, W): share of samples
            else:
                means.append(model.predict_at_mean(image)[:, 0].float().cpu())
            if keep_samples or dist is not None:
                if keep_samples:
                    samples.append(binary.to(torch.uint8).cpu())
                if dist is not None:
                    dist.update(binary, batch["masks"].to(device), batch["rater_count"])
            if with_terms:
                for k, v in elbo_terms(model, image, batch["mask"].to(device),
                                       posterior_dice=posterior_dice and model.test_time_z == "prior").items():
                    terms.setdefault(k, []).append(v.float().cpu())
    finally:
        model.train(was_training)
    return Predictions(
        mean=torch.cat(means).numpy() if means else np.zeros((0, data.image_size, data.image_size), np.float32),
        samples=torch.cat(samples).numpy() if samples else None,
        terms={k: torch.cat(v).numpy() for k, v in terms.items()},
        distribution=dist.per_image() if dist is not None else {},
    )
