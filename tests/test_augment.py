"""Augmentation: image and every annotator's mask move together, draws depend on
the generator alone, and only training batches are ever augmented."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import pyroseg.train as train_mod
from pyroseg.augment import SPECS, AugmentSpec, augment_batch, step_generator
from pyroseg.config import FitConfig
from pyroseg.data import load_source, split_patients
from pyroseg.train import fit

B, A, H = 6, 3, 32
GEOMETRY = AugmentSpec(flip_p=0.5, max_rotate_deg=15.0, scale=(0.9, 1.1))  # "standard" without the intensity changes


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with an off-centre bright blob (nothing left-right symmetric) and,
    per annotator, the mask of where channel 0 exceeds a different level: a
    mask is a function of its own image, so alignment can be checked after a transform."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(H, dtype=torch.float32), indexing="ij")
    cy, cx = 8 + 16 * torch.rand(B, 1, 1, generator=g), 4 + 10 * torch.rand(B, 1, 1, generator=g)  # left half
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)  # (B, H, W)
    image = torch.stack([blob, blob.flip(-2), 0.5 * blob], 1)  # (B, 3, H, W)
    masks = torch.stack([(blob > level).float() for level in (0.3, 0.5, 0.7)], 1)  # (B, A, H, W)
    return image, masks


def _recomputed(image: torch.Tensor) -> torch.Tensor:
    """The masks of :func:`_batch` computed again from a (transformed) image."""
    return torch.stack([(image[:, 0] > level).float() for level in (0.3, 0.5, 0.7)], 1)


def test_flip_is_exact_and_moves_every_mask_with_its_image():
    image, masks = _batch()
    out_i, out_m = augment_batch(image, masks, AugmentSpec(flip_p=1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out_i, image.flip(-1)) and torch.equal(out_m, masks.flip(-1))
    assert torch.equal(out_m, _recomputed(out_i))
    assert not torch.equal(out_m, masks)  # the blob is off-centre: a flip is visible


@pytest.mark.parametrize("spec", ["flip", GEOMETRY])
def test_image_and_masks_stay_aligned_and_a_mask_moved_alone_would_not(spec):
    """After a random flip / rotation / scaling, each annotator's mask still is
    the threshold of its transformed image (up to border pixels of the
    bilinear resampling), and the check has teeth: masks flipped without their
    images fail it."""
    image, masks = _batch()
    out_i, out_m = augment_batch(image, masks, spec, generator=torch.Generator().manual_seed(1))
    assert out_i.shape == image.shape and out_m.shape == masks.shape
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}
    agree = (out_m == _recomputed(out_i)).float().mean(dim=(1, 2, 3))  # (B,)
    assert agree.min() > 0.99, agree
    assert not torch.equal(out_i, image)  # something did move
    wrong = (out_m.flip(-1) == _recomputed(out_i)).float().mean(dim=(1, 2, 3))
    assert wrong.min() < 0.99, wrong  # a mask moved without its image is caught


def test_standard_keeps_ranges_and_is_a_function_of_the_generator():
    image, masks = _batch()
    a = augment_batch(image, masks, "standard", generator=step_generator(0, 5))
    b = augment_batch(image, masks, "standard", generator=step_generator(0, 5))
    c = augment_batch(image, masks, "standard", generator=step_generator(0, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert 0 <= float(a[0].min()) and float(a[0].max()) <= 1
    assert set(a[1].unique().tolist()) <= {0.0, 1.0}
    assert step_generator(0, 5, rank=1).initial_seed() != step_generator(0, 5, rank=0).initial_seed()


def test_none_changes_nothing_and_inputs_are_not_modified():
    image, masks = _batch()
    before = image.clone(), masks.clone()
    out = augment_batch(image, masks, "none", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0], image) and torch.equal(out[1], masks)
    augment_batch(image, masks, "standard", generator=torch.Generator().manual_seed(0))
    assert torch.equal(image, before[0]) and torch.equal(masks, before[1])
    with pytest.raises(ValueError, match="do not pair"):
        augment_batch(image, masks[:, :, :16], "flip", generator=torch.Generator())
    assert set(SPECS) == {"none", "flip", "standard"}


def test_fit_augments_training_batches_only(tmp_path, monkeypatch):
    """Every batch that reaches augmentation holds training slices only (no
    validation or test patient's slice), one call per step; validation and
    evaluation never augment (a call from them would be counted here)."""
    calls: list[torch.Tensor] = []
    real = train_mod.augment_batch

    def spy(image, masks, spec, *, generator):
        calls.append(image.detach().clone())
        return real(image, masks, spec, generator=generator)

    monkeypatch.setattr(train_mod, "augment_batch", spy)
    cfg = FitConfig(model="unet", out=str(tmp_path / "run"), image_size=32, epochs=2, batch_size=8, synthetic_patients=6,
                    synthetic_slices=8, widths=(8, 16, 32, 64), val_samples=1, device="cpu", augment="standard")
    out = fit(cfg, pictures=False)
    data = load_source("synthetic", 32, seed=0, synthetic_patients=6, synthetic_slices=8)
    split = split_patients(data.patient_ids, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=0)

    def digests(images) -> set[str]:
        arr = (np.asarray(images, dtype=np.float32) if not isinstance(images, torch.Tensor) else images.numpy())
        return {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in arr}

    train = digests(data.subset(split["train"]).images.astype(np.float32) / 255.0)
    held_out = digests(data.subset(split["val"] + split["test"]).images.astype(np.float32) / 255.0)
    seen = set().union(*(digests(c) for c in calls))
    steps = int(torch.load(out / "checkpoint.pt", weights_only=True)["global_step"])
    assert len(calls) == steps == 2 * -(-len(data.subset(split["train"])) // 8)
    assert seen <= train and not (seen & held_out)
    assert len(seen) == len(train)  # every training slice went through, nothing else
