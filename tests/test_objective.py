"""SiteELBO: Pyro's ELBOs written out site by site, and the free-bits floor."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyroseg.models import build_model
from pyroseg.objective import SiteELBO, free_bits
from pyroseg.predict import elbo_terms

H = 32
B = 4


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, H, generator=g), (torch.rand(B, 1, H, H, generator=g) > 0.85).float()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, analytic", [("hvae", True), ("hprob_unet", False)])
def test_site_elbo_equals_pyros_elbo_in_value_and_gradient(name, analytic):
    """Without free bits, SiteELBO is TraceMeanField_ELBO (analytic KL) or
    Trace_ELBO (MC KL), at beta and recon_scale != 1 too, same noise."""
    image, mask = _batch()
    model = build_model(name, image_size=H)
    kw = dict(beta=0.3, recon_scale=2.5)
    pyro.set_rng_seed(1)
    ours = SiteELBO(analytic_kl=analytic).differentiable_loss(model.model, model.guide, image, mask, **kw)
    g_ours = _grads(model, ours)
    pyro.set_rng_seed(1)
    ref_elbo = TraceMeanField_ELBO() if analytic else Trace_ELBO()
    ref = ref_elbo.differentiable_loss(model.model, model.guide, image, mask, **kw)
    g_ref = _grads(model, ref)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert g_ours.keys() == g_ref.keys()
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_terms_come_from_the_same_pass_and_add_up_to_the_loss():
    """loss = recon_scale * sum(recon) + beta * sum(KL), with the returned per-image
    terms; they match predict.elbo_terms on the same noise."""
    image, mask = _batch()
    model = build_model("hvae", image_size=H)
    pyro.set_rng_seed(2)
    loss, terms = SiteELBO().differentiable_loss_and_terms(model.model, model.guide, image, mask, beta=0.5, recon_scale=3.0)
    assert set(terms) == {"recon", "kl_z_3", "kl_z_2", "kl_z_1"}
    assert all(v.shape == (B,) and not v.requires_grad for v in terms.values())
    kl = sum(terms[k] for k in terms if k.startswith("kl_"))
    assert float(loss.detach()) == pytest.approx(float(3.0 * terms["recon"].sum() + 0.5 * kl.sum()), rel=1e-5)
    pyro.set_rng_seed(2)
    ref = elbo_terms(model, image, mask)
    for k, v in terms.items():
        torch.testing.assert_close(v, ref[k].detach(), rtol=1e-5, atol=1e-4)


def test_free_bits_floor_value_and_gradient():
    kl = torch.tensor([0.5, 1.0, 2.5], requires_grad=True)  # batch mean 1.333
    below = free_bits(kl, 2.0)  # mean under the floor: the constant floor, no gradient
    assert below.tolist() == [2.0, 2.0, 2.0]
    (g,) = torch.autograd.grad(below.sum(), kl, allow_unused=True)
    assert g is None or torch.equal(g, torch.zeros(3))
    above = free_bits(kl, 1.0)  # mean over the floor: unchanged (the floor is on the batch mean,
    assert above.tolist() == [0.5, 1.0, 2.5]  # not per image: 0.5 < 1 passes through), gradient 1 each
    (g,) = torch.autograd.grad(above.sum(), kl)
    assert g.tolist() == [1.0, 1.0, 1.0]
    assert free_bits(kl, 0.0) is kl


def _toy(loc0: float):
    """z ~ N(0, I_2) per image, y ~ N(sum z, 1) observed; q(z) = N(loc, I_2) with
    loc = (loc0, loc0): KL = |loc|^2 / 2 = loc0^2 per image."""
    loc = torch.full((2,), loc0, requires_grad=True)

    def model(x):
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(x):
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("z", dist.Normal(loc.expand(x.shape[0], 2), 1.0).to_event(1))

    return loc, model, guide


@pytest.mark.parametrize("loc0, floor, floored", [(0.5, 1.0, True), (2.0, 1.0, False), (0.5, 0.0, False)])
def test_free_bits_switch_off_the_kl_gradient_below_the_floor_only(loc0, floor, floored):
    """KL = loc0^2 per image: 0.25 with loc0 = 0.5 (under a 1-nat floor), 4 with
    loc0 = 2 (over it). For 3 images the KL term's gradient on each entry of loc is
    3 * loc0: gone under the floor, there over it; the likelihood's stays."""
    x = torch.zeros(3)
    loc, model, guide = _toy(loc0)
    pyro.set_rng_seed(0)
    loss, terms = SiteELBO(free_bits=floor).differentiable_loss_and_terms(model, guide, x)
    (g,) = torch.autograd.grad(loss, loc)
    loc_p, model_p, guide_p = _toy(loc0)
    pyro.set_rng_seed(0)  # same noise, no floor
    (g_plain,) = torch.autograd.grad(SiteELBO().differentiable_loss(model_p, guide_p, x), loc_p)
    torch.testing.assert_close(terms["kl_z"], torch.full((3,), loc0**2))
    g_kl = torch.full((2,), 3 * loc0)
    torch.testing.assert_close(g, g_plain - g_kl if floored else g_plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(g_plain - g_kl, g_plain)  # the two cases differ
    kl_value = 3 * (floor if floored else loc0**2)
    assert float(loss.detach()) == pytest.approx(float(terms["recon"].sum()) + kl_value, rel=1e-5)
