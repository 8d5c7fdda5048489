"""Augmentation of training batches: flips, small rotations and scalings, intensity changes.

:func:`augment_batch` transforms a whole batch at once, on the device the batch
is on, with one random draw per slice:

* geometry (``flip``, ``standard``): a left-right flip with probability 1/2
  (brain slices are near-symmetric left-right, not top-bottom); ``standard``
  adds a rotation uniform in +-15 degrees and an isotropic scaling uniform in
  [0.9, 1.1], the ranges of Buda et al. (2019)'s LGG U-Net (+-15 degrees,
  +-5 % scale, horizontal flips; we allow +-10 % scale);
* intensity (``standard``): per slice, with the probabilities and ranges of
  nnU-Net's default 2-D pipeline (Isensee et al. 2021), on our [0, 1] images:
  gamma ``x ** g``, g uniform in [0.7, 1.5] (p 0.3); contrast about the slice
  mean, factor uniform in [0.75, 1.25] (p 0.15); additive Gaussian noise, std
  uniform in [0, 0.03] (p 0.15); the result clipped to [0, 1].

The image and *every* mask channel (one per annotator, or the one annotator a
step trains on) move with the same geometric transform: they go through one
:func:`torch.nn.functional.grid_sample` call as channels of one tensor, so
they cannot drift apart. The image is resampled bilinearly (zeros outside,
the MRI background); a mask bilinearly and then thresholded at 1/2, which
keeps it binary and, unlike nearest-neighbour lookup, never shifts a border by
a pixel with the sampling grid. A pure flip is done by indexing, exactly.
Intensity changes touch the image only.

Why plain torch and not ``torchvision.transforms.v2`` (which handles image +
mask pairs): PyPI's torchvision wheels are each built against one torch
release, and none imports beside the torch 2.13.0 this project runs on; a
medical-imaging library (MONAI, TorchIO) would add a large dependency for
five transforms. Written as batched tensor operations, augmentation runs on the
training device (GPU or CPU) inside the step's own stream, costs about 1 % of
a CPU step at 64x64 (``data_time_s`` in metrics.csv), and needs no DataLoader
workers.

Randomness: each call takes an explicit :class:`torch.Generator`; ``fit`` seeds
one from ``(seed, global step, rank)`` per step (:func:`step_generator`), so
the draws are a pure function of the position in training. A resumed run
draws exactly what an unbroken one would, and augmentation leaves the global
random streams (the latent noise ``z``) where they were.

Validation, test, ``evaluate`` and ``sample`` data are never augmented: only
:meth:`pyroseg.train.FitRun.train_epoch` calls this module.

References: M. Buda, A. Saha, M. A. Mazurowski, "Association of genomic
subtypes of lower-grade gliomas with shape features automatically extracted
by a deep learning algorithm", Computers in Biology and Medicine 109 (2019).
F. Isensee et al., "nnU-Net: a self-configuring method for deep
learning-based biomedical image segmentation", Nature Methods 18 (2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pyroseg.config import AUGMENTS  # the values of --augment, checked by FitConfig.validate

__all__ = ["AUGMENTS", "AugmentSpec", "SPECS", "augment_batch", "step_generator"]



@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities and ranges of the random transforms (see the module docs)."""

    flip_p: float = 0.0
    max_rotate_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    gamma_p: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast_p: float = 0.0
    contrast: tuple[float, float] = (0.75, 1.25)
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.03)

    @property
    def affine(self) -> bool:
        return self.max_rotate_deg > 0 or self.scale != (1.0, 1.0)

    @property
    def intensity(self) -> bool:
        return self.gamma_p > 0 or self.contrast_p > 0 or self.noise_p > 0


SPECS: dict[str, AugmentSpec] = {
    "none": AugmentSpec(),
    "flip": AugmentSpec(flip_p=0.5),
    "standard": AugmentSpec(flip_p=0.5, max_rotate_deg=15.0, scale=(0.9, 1.1), gamma_p=0.3, contrast_p=0.15, noise_p=0.15),
}


def step_generator(seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, step, rank)`` alone."""
    state = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def augment_batch(image: torch.Tensor, masks: torch.Tensor, spec: AugmentSpec | str, *,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transform a batch; returns new ``(image, masks)``, inputs untouched.

    ``image``: float ``(B, C, H, W)`` in [0, 1]; ``masks``: float ``(B, A, H, W)``
    in {0, 1}, any number ``A`` of annotators, all moved with their image.
    ``spec``: an :class:`AugmentSpec` or a name of :data:`SPECS`. The draws
    come from ``generator`` only (on the batch's device), in a fixed order.
    """
    if isinstance(spec, str):
        spec = SPECS[spec]
    if image.shape[0] != masks.shape[0] or image.shape[2:] != masks.shape[2:]:
        raise ValueError(f"augment_batch: image {tuple(image.shape)} and masks {tuple(masks.shape)} do not pair")
    b, c, dev = image.shape[0], image.shape[1], image.device
    if b == 0:
        return image, masks
    flip = torch.rand(b, generator=generator, device=dev) < spec.flip_p  # (B,) drawn for every spec: fixed order
    if spec.affine:
        angle = _uniform(-spec.max_rotate_deg, spec.max_rotate_deg, b, generator, dev) * (math.pi / 180)
        scale = _uniform(*spec.scale, b, generator, dev)
        sign = 1.0 - 2.0 * flip.to(image.dtype)  # -1: mirror x
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input coordinates: zoom in = sample less
        theta = torch.stack([torch.stack([cos * sign, -sin, torch.zeros_like(cos)], -1),
                             torch.stack([sin * sign, cos, torch.zeros_like(cos)], -1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(image.shape[:2]) + list(image.shape[2:]), align_corners=False)
        both = F.grid_sample(torch.cat([image, masks.to(image.dtype)], 1), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=False)  # (B, C + A, H, W): one transform for all
        image, masks = both[:, :c], (both[:, c:] >= 0.5).to(masks.dtype)
    elif spec.flip_p > 0:
        f = flip.view(b, 1, 1, 1)
        image, masks = torch.where(f, image.flip(-1), image), torch.where(f, masks.flip(-1), masks)
    if spec.intensity:
        image = _intensity(image, spec, generator)
    return image, masks


def _intensity(image: torch.Tensor, spec: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    """Gamma, contrast and noise, each on a random share of the slices (image ``(B, C, H, W)`` in [0, 1])."""
    b, dev = image.shape[0], image.device
    view = (b, 1, 1, 1)
    on = torch.rand(b, generator=g, device=dev) < spec.gamma_p
    gamma = torch.where(on, _uniform(*spec.gamma, b, g, dev), torch.ones(b, device=dev))
    image = image.clamp(0, 1).pow(gamma.view(view))
    on = torch.rand(b, generator=g, device=dev) < spec.contrast_p
    factor = torch.where(on, _uniform(*spec.contrast, b, g, dev), torch.ones(b, device=dev)).view(view)
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    image = (image - mean) * factor + mean
    on = torch.rand(b, generator=g, device=dev) < spec.noise_p
    std = torch.where(on, _uniform(*spec.noise_std, b, g, dev), torch.zeros(b, device=dev)).view(view)
    image = image + std * torch.randn(image.shape, generator=g, device=dev, dtype=image.dtype)
    return image.clamp(0, 1)
