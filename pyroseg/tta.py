"""Test-time augmentation: exact flips of the input turned into samples, for any model.

``TestTimeAugmentation(model)`` samples ``model`` on the image, flipped left-right,
flipped up-down and both (the four flips of the plane, a group: each is its own
inverse), and flips each prediction back. Flips are exact for every model here: no
interpolation, nothing lost at the borders, and the image size is kept, so each flipped
prediction is a prediction for the same pixels. (Rotations by 90 degrees are exact too on
square images, but a brain slice rotated by 90 degrees is not an image the models were
trained on; they are left out.) A deterministic U-Net gets 4 different predictions, so an
uncertainty map; a model with a latent gets its own samples spread over the 4 flips.

Sample ``i`` comes from flip ``i % 4``. :meth:`num_draws` asks for 4 samples of a
deterministic model (one per flip) and otherwise 4 times what the wrapped model asks for a
quarter of the samples (``4 * base.num_draws(ceil(n / 4))``), so that the mean of the
samples weighs the flips alike *and* each flip weighs the wrapped model's own draws alike:
an ensemble of 5 U-Nets gives 20 samples, every member under every flip. The ELBO terms (``model``/``guide``) are those of the
wrapped model on the unflipped image.

References: Wang et al., "Aleatoric uncertainty estimation with test-time augmentation
for medical image segmentation with convolutional neural networks", Neurocomputing 2019.
"""

from __future__ import annotations

import math

import torch

from pyroseg.models.base import SegModel

__all__ = ["FLIPS", "TestTimeAugmentation"]

#: The flips, as the image dims each reverses: identity, left-right, up-down, both.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, dims) if dims else x


class TestTimeAugmentation(SegModel):
    """Wraps a trained model; ``sample`` draws over the flips (see the module docs)."""

    stochastic = True
    __test__ = False  # not a pytest class

    def __init__(self, base: SegModel):
        super().__init__(image_size=base.image_size, in_channels=base.in_channels, widths=base.widths)
        self.base = base
        self.name = f"{base.name}+tta"
        self.latent_sites = base.latent_sites
        self.guide_is_prior = base.guide_is_prior
        self.sample_from = f"{base.sample_from}, 4 flips"  # what the report says
        self.test_time_z = base.test_time_z  # what code acts on
        self.point_prediction = base.point_prediction  # its mean-z: the flips' mean of the base's

    def hparams(self):
        return self.base.hparams()

    def num_draws(self, num_samples: int) -> int:
        k = len(FLIPS)
        return k * self.base.num_draws(math.ceil(num_samples / k)) if self.base.has_latent else k

    def model(self, image, mask=None, **kw):
        return self.base.model(image, mask, **kw)

    def guide(self, image, mask=None, **kw):
        return self.base.guide(image, mask, **kw)

    @torch.inference_mode()
    def predict_at_mean(self, image: torch.Tensor) -> torch.Tensor:
        """The mean over the four flips of the wrapped model's mean-z prediction."""
        return torch.stack([_flip(self.base.predict_at_mean(_flip(image, dims)), dims) for dims in FLIPS]).mean(0)

    def sample(self, image: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """``(num_samples, B, 1, H, W)``; sample ``i`` from flip ``i % 4``.

        Each flip asks the wrapped model for ``base.num_draws(ceil(num_samples / 4))``
        samples (one, for a deterministic model), all of which are kept and repeated in
        turn when fewer than a quarter of ``num_samples``: with ``num_samples =
        num_draws(n)`` every flip gets every draw the wrapped model asked for (an
        ensemble's members all take part)."""
        k = len(FLIPS)
        per = math.ceil(num_samples / k)
        m = self.base.num_draws(per) if self.base.has_latent else 1
        keep = torch.arange(max(per, m), device=image.device) % m  # the m draws, in turn
        draws = [_flip(self.base.sample(_flip(image, dims), m), dims)[keep] for dims in FLIPS]  # (max(per, m), B, 1, H, W)
        return torch.stack(draws, dim=1).flatten(0, 1)[:num_samples]  # flips interleaved
