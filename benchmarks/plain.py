"""Hand-written PyTorch twins of two pyroseg models: the yardstick for Pyro's overhead.

Each twin uses the *same* network modules as the pyroseg model it mirrors, the
same loss (per image, averaged over the batch) and the same optimiser
(``torch.optim.Adam``), with no Pyro anywhere:

* ``unet``: ``loss = BCE_with_logits(unet(x), y).sum over pixels``;
* ``prob_unet``: ``z = loc_q + scale_q * eps`` from the posterior net on ``[x, y]``,
  ``loss = BCE(fcomb(u(x), z), y) + beta * KL(N(loc_q, scale_q) || N(loc_p, scale_p))``
  with the KL analytic (what ``TraceMeanField_ELBO`` computes).

With the same seed their loss equals the Pyro loss (``check_same_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from pyroseg.models import SegModel

__all__ = ["PLAIN", "PlainStep", "check_same_loss"]

PLAIN = ("unet", "prob_unet")


class PlainStep:
    """``step(image, mask, beta)``: zero grads, loss, backward, Adam step; returns the loss as a float
    (``loss.item()``, as a hand-written loop that logs its loss does: on a GPU one sync per step)."""

    def __init__(self, model: SegModel, lr: float = 1e-3):
        if model.name not in PLAIN:
            raise ValueError(f"no hand-written twin of {model.name!r}; there are {PLAIN}")
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss(self, image: torch.Tensor, mask: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        m = self.model
        if m.name == "unet":
            logits = m.unet(image)  # (B, 1, H, W)
            recon = F.binary_cross_entropy_with_logits(logits, mask, reduction="none").flatten(1).sum(1)  # (B,)
            return recon.mean()
        # prob_unet: the guide first (as Pyro runs it), then the model
        loc_q, scale_q = m.posterior_net(torch.cat([image, mask], dim=1))  # (B, D) each
        z = Normal(loc_q, scale_q).rsample()  # (B, D)
        u = m.unet.features(image)  # (B, w0, H, W)
        loc_p, scale_p = m.prior_net(image)
        logits = m.fcomb(u, z.unsqueeze(0)).squeeze(0)  # (B, 1, H, W)
        recon = F.binary_cross_entropy_with_logits(logits, mask, reduction="none").flatten(1).sum(1)  # (B,)
        kl = kl_divergence(Normal(loc_q, scale_q), Normal(loc_p, scale_p)).sum(-1)  # (B,)
        return (recon + beta * kl).mean()

    def step(self, image: torch.Tensor, mask: torch.Tensor, beta: float = 1.0, *, item: bool = True):
        """``item=False``: return the loss tensor, not ``loss.item()`` (no wait for a GPU)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(image, mask, beta)
        loss.backward()
        self.optimizer.step()
        return loss.item() if item else loss.detach()


def check_same_loss(model: SegModel, image: torch.Tensor, mask: torch.Tensor, beta: float = 0.5) -> float:
    """Relative difference between the twin's loss and Pyro's ``TraceMeanField_ELBO``
    loss per image, same weights and same noise (should be ~1e-7)."""
    import pyro
    from pyro.infer import TraceMeanField_ELBO

    with torch.no_grad():
        pyro.set_rng_seed(1)
        ours = float(PlainStep(model).loss(image, mask, beta))
        pyro.set_rng_seed(1)
        theirs = float(TraceMeanField_ELBO().differentiable_loss(model.model, model.guide, image, mask, beta=beta)) / image.shape[0]
    return abs(ours - theirs) / max(abs(theirs), 1e-12)
