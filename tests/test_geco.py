"""GECO: the update rules by value, the multiplier reaching the likelihood site,
and its state surviving a resume."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from pyroseg.config import FitConfig
from pyroseg.errors import UsageError
from pyroseg.geco import (
    GECO,
    TopKLikelihood,
    auto_kappa,
    inverse_softplus_squared,
    moving_average,
    multiplier_step,
    softplus_squared,
    topk_pixels,
)
from pyroseg.models import build_model
from pyroseg.train import Trainer, fit


def test_moving_average_starts_at_the_first_value_then_decays():
    assert moving_average(None, 0.3, 0.99) == 0.3
    assert moving_average(0.3, 0.1, 0.9) == pytest.approx(0.9 * 0.3 + 0.1 * 0.1)
    assert moving_average(0.3, 0.1, 0.0) == 0.1


def test_multiplier_step_is_exponential_bounded_and_clipped():
    assert multiplier_step(2.0, 0.05, rate=1.0) == pytest.approx(2.0 * math.exp(0.05))
    assert multiplier_step(2.0, -0.05, rate=1.0) == pytest.approx(2.0 * math.exp(-0.05))  # shrinks when met
    assert multiplier_step(2.0, 0.05, rate=1.0, max_step=0.01) == pytest.approx(2.0 * math.exp(0.01))
    assert multiplier_step(2.0, -5.0, rate=1.0, max_step=0.01) == pytest.approx(2.0 * math.exp(-0.01))
    assert multiplier_step(2.0, 5.0, rate=1.0, lambda_max=3.0) == 3.0
    assert multiplier_step(2.0, -5.0, rate=1.0, lambda_min=1.5) == 1.5


def test_geco_update_sequence_by_hand():
    g = GECO(kappa=0.1, alpha=0.5, rate=2.0, warmup_steps=1, max_step=1.0)
    assert g.recon_scale == 1.0
    # step 1 (warm-up): C_ma = 0.3 - 0.1 = 0.2, lambda unchanged
    assert g.update(0.3) == 1.0 and g.c_ma == pytest.approx(0.2) and g.steps == 1
    # step 2: C_ma = 0.5 * 0.2 + 0.5 * (0.2 - 0.1) = 0.15; lambda = exp(2 * 0.15)
    assert g.update(0.2) == pytest.approx(math.exp(0.3))
    assert g.c_ma == pytest.approx(0.15)
    # step 3: reconstruction better than kappa: C_ma = 0.5 * 0.15 + 0.5 * (0.0 - 0.1) = 0.025, still > 0
    lam = g.update(0.0)
    assert lam == pytest.approx(math.exp(0.3) * math.exp(0.05))
    # step 4: C_ma = 0.5 * 0.025 - 0.05 = -0.0375 < 0: lambda goes down
    assert g.update(0.0) == pytest.approx(lam * math.exp(-0.075))
    # a non-finite reconstruction changes nothing
    before = g.state_dict()
    g.update(float("nan"))
    assert g.state_dict() == before


def test_geco_state_dict_round_trip():
    g = GECO(kappa=0.02, warmup_steps=0)
    for c in (0.1, 0.05, 0.01):
        g.update(c)
    h = GECO(kappa=0.5)
    h.load_state_dict(g.state_dict())
    assert (h.lam, h.c_ma, h.steps, h.kappa) == (g.lam, g.c_ma, g.steps, g.kappa)
    assert all(isinstance(v, (int, float)) for v in g.state_dict().values())  # weights_only-safe


def test_auto_kappa_is_a_quarter_of_the_entropy_of_the_lesion_share():
    masks = np.zeros((10, 1, 10, 10), np.uint8)
    masks[0, 0, :5, :2] = 1  # 10 of 1000 pixels: p = 0.01
    h = -(0.01 * math.log(0.01) + 0.99 * math.log(0.99))
    assert auto_kappa(masks) == pytest.approx(0.25 * h)
    assert auto_kappa(masks, fraction=1.0) == pytest.approx(h)


def test_geco_config_is_validated():
    with pytest.raises(UsageError, match="--objective"):
        FitConfig(objective="vi").validate()
    with pytest.raises(UsageError, match="--geco-kappa"):
        FitConfig(objective="geco", geco_kappa=0).validate()
    with pytest.raises(UsageError, match="--geco-alpha"):
        FitConfig(geco_alpha=1.0).validate()
    with pytest.raises(UsageError, match="--free-bits"):
        FitConfig(free_bits=-1).validate()
    with pytest.raises(UsageError, match="--geco-constraint"):
        FitConfig(geco_constraint="max").validate()
    with pytest.raises(UsageError, match="--geco-top-k"):
        FitConfig(geco_top_k=0).validate()
    with pytest.raises(UsageError, match="--geco-update"):
        FitConfig(geco_update="adam").validate()
    cfg = FitConfig(objective="geco", epochs=20).validate()
    # DeepMind's defaults: top-k, softplus multiplier at rate 1e-2, no warm-up; no KL annealing under GECO
    assert (cfg.geco_constraint, cfg.geco_top_k, cfg.geco_update, cfg.geco_rate) == ("topk", 0.02, "softplus", 1e-2)
    assert cfg.beta_warmup == 0.0 and cfg.geco_warmup == 0.0 and not cfg.geco_deterministic_top_k
    old = FitConfig(objective="geco", epochs=20, geco_update="multiplicative").validate()
    assert old.geco_rate == 1.0 and old.geco_warmup == 2.0  # the earlier rule: lambda fixed 2 epochs


def test_a_geco_config_of_an_earlier_pyroseg_keeps_its_rule():
    d = FitConfig(objective="geco").to_dict()
    for k in ("geco_constraint", "geco_top_k", "geco_deterministic_top_k", "geco_update"):
        del d[k]
    cfg = FitConfig.from_dict(d)
    assert (cfg.geco_constraint, cfg.geco_update) == ("mean", "multiplicative")
    assert FitConfig.from_dict(FitConfig(objective="geco").to_dict()).geco_constraint == "topk"


def test_deterministic_top_k_selects_the_largest_cross_entropies():
    ce = torch.rand(4, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    keep = topk_pixels(ce, 0.02, deterministic=True)  # k = floor(0.02 * 400) = 8, over the whole batch
    assert keep.shape == ce.shape and keep.dtype == torch.bool and int(keep.sum()) == 8
    assert float(ce[keep].min()) > float(ce[~keep].max())
    assert int(topk_pixels(ce, 1e-6, deterministic=True).sum()) == 1  # at least one pixel


def test_stochastic_top_k_draws_pixels_in_proportion_to_their_cross_entropy():
    ce = torch.tensor([0.0, 1.0, 3.0, 6.0]).view(1, 1, 2, 2)
    torch.manual_seed(0)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        keep = topk_pixels(ce, 0.25)  # k = 1: one categorical draw with p = ce / sum(ce)
        assert int(keep.sum()) == 1
        counts += keep.view(-1).float()
    assert counts[0] == 0  # a pixel already right is never drawn
    torch.testing.assert_close(counts / n, torch.tensor([0.0, 0.1, 0.3, 0.6]), atol=0.025, rtol=0)


def test_top_k_messenger_makes_the_likelihood_the_top_k_cross_entropy():
    """Under ``TopKLikelihood`` the "mask" site's log-probability is minus the summed
    cross-entropy of the selected pixels only, per image; outside it, of all of them."""
    from pyro import poutine

    g = torch.Generator().manual_seed(0)
    image, mask = torch.rand(2, 3, 32, 32, generator=g), (torch.rand(2, 1, 32, 32, generator=g) > 0.9).float()
    model = build_model("unet", image_size=32)
    full = poutine.trace(model.model).get_trace(image, mask).nodes["mask"]
    ce = -full["fn"].base_dist.log_prob(mask).detach()  # (2, 1, 32, 32)
    handler = TopKLikelihood(0.02, deterministic=True)
    with handler:
        site = poutine.trace(model.model).get_trace(image, mask).nodes["mask"]
    keep = topk_pixels(ce, 0.02, deterministic=True)  # 40 of 2048 pixels
    expected = -(ce * keep).sum(dim=(1, 2, 3))
    torch.testing.assert_close(site["fn"].log_prob(mask).detach(), expected, rtol=1e-5, atol=1e-5)
    assert site["fn"].event_shape == (1, 32, 32) and site["fn"].batch_shape == (2,)
    assert handler.pixels_per_image == pytest.approx(40 / 2)
    counting = TopKLikelihood(None)
    with counting:
        poutine.trace(model.model).get_trace(image, mask)
    assert counting.pixels_per_image == 32 * 32


def test_constraint_units_top_k_per_image_and_mean_per_pixel():
    """DeepMind's constraint: ma(sum of the selected pixels' CE) - kappa * N, nats per image;
    the mean constraint: nats per pixel."""
    top = GECO(kappa=0.05, constraint="topk")
    assert top.constraint_value(10.0, pixels=82) == pytest.approx(10.0 - 0.05 * 82)
    mean = GECO(kappa=0.02, constraint="mean")
    assert mean.constraint_value(40.96, pixels=4096) == pytest.approx(0.01 - 0.02)
    assert mean.constraint_value(0.01) == pytest.approx(0.01 - 0.02)  # the old call: already per pixel


def test_softplus_multiplier_is_adam_ascent_on_w():
    """lambda = softplus(w)^2 starts at 1; Adam's first step moves w by lr against
    the gradient -rate * C_ma * dlambda/dw, i.e. up while the constraint is unmet."""
    g = GECO(kappa=0.05, constraint="topk", update_rule="softplus", rate=1e-2, lr=0.1, alpha=0.0)
    assert g.lam == 1.0 and softplus_squared(g.w) == pytest.approx(1.0)
    w0 = g.w
    g.update(10.0, pixels=20)  # C = 10 - 1 = 9 > 0: unmet
    assert g.w == pytest.approx(w0 + 0.1, rel=1e-6) and g.lam == pytest.approx(softplus_squared(w0 + 0.1))
    assert g.lam > 1.0
    ws = []
    for _ in range(40):
        g.update(0.0, pixels=20)  # C = -1: met; w turns back down once Adam's momentum turns
        ws.append(g.w)
    assert ws[-1] < ws[-2] and ws[-1] < max(ws)
    assert inverse_softplus_squared(softplus_squared(0.3)) == pytest.approx(0.3)
    h = GECO(kappa=0.05, update_rule="softplus")
    h.load_state_dict(g.state_dict())
    assert (h.lam, h.w, h.adam_m, h.adam_v, h.steps) == (g.lam, g.w, g.adam_m, g.adam_v, g.steps)


def test_lambda_scales_the_likelihood_gradient_only():
    """recon_scale = lambda multiplies the likelihood site in the step: the
    trainer's loss equals lambda * recon + KL of the same pass."""
    g = torch.Generator().manual_seed(0)
    image, mask = torch.rand(4, 3, 32, 32, generator=g), (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float()
    model = build_model("prob_unet", image_size=32)
    trainer = Trainer(model, lr=1e-3)
    out = trainer.step(image, mask, recon_scale=3.0)
    kl = sum(float(v) for k, v in out.terms.items() if k.startswith("kl_"))
    assert out.loss == pytest.approx(3.0 * float(out.terms["recon"]) + kl, rel=1e-5)


def _cfg(tmp_path, out, epochs, **kw):
    base = dict(model="hvae", data="synthetic", out=str(tmp_path / out), image_size=32, epochs=epochs, batch_size=16,
                synthetic_patients=5, synthetic_slices=8, val_samples=1, seed=0, objective="geco", geco_kappa=0.01,
                geco_warmup=0.5, free_bits=0.5)
    base.update(kw)
    return FitConfig(**base)


def test_geco_and_free_bits_state_survives_a_resume(tmp_path):
    """1 epoch, then resume to 2, equals 2 epochs straight: weights, lambda, C_ma;
    lambda and C_ma are logged per epoch and saved in the checkpoint."""
    straight = fit(_cfg(tmp_path, "straight", 2), pictures=False)
    part = fit(_cfg(tmp_path, "part", 1), pictures=False)
    fit(FitConfig(out=str(part), epochs=2), resume=True, pictures=False)
    s1 = torch.load(straight / "checkpoint.pt", weights_only=True)
    s2 = torch.load(part / "checkpoint.pt", weights_only=True)
    assert s1["geco"] == s2["geco"]
    assert s1["geco"]["steps"] == 2 * 2 and s1["geco"]["lam"] != 1.0  # 2 steps per epoch, warm-up of 1 step
    for k in s1["model_state"]:
        torch.testing.assert_close(s1["model_state"][k], s2["model_state"][k], rtol=0, atol=0, msg=k)
    rows = list(csv.DictReader(open(part / "metrics.csv")))
    assert [float(r["geco_lambda"]) for r in rows][-1] == pytest.approx(s2["geco"]["lam"], rel=1e-5)
    assert {"geco_c_ma", "val_au_z_1", "val_effect_z_3", "val_dice_change_z_2"} <= set(rows[0])
    doc = json.loads((part / "config.json").read_text())
    assert doc["fit"]["free_bits"] == 0.5 and doc["geco"]["kappa"] == 0.01
    assert doc["model"]["latent_units"] == {"z_3": 16, "z_2": 32, "z_1": 64}
    assert doc["fit"]["geco_constraint"] == "topk" and doc["fit"]["geco_update"] == "softplus"


def test_top_k_reaches_every_likelihood_site_and_the_constraint_covers_what_lambda_scales():
    """PHiSeg's per-level "mask_l" sites are restricted to their own top-k too, and the
    step's recon/pixels are the sums over the sites, weighted as lambda weighs them
    (before: only "mask" was restricted and measured, while lambda also scaled the whole-image
    "mask_l" sums)."""
    from pyro import poutine

    g = torch.Generator().manual_seed(0)
    image, mask = torch.rand(2, 1, 32, 32, generator=g), (torch.rand(2, 1, 32, 32, generator=g) > 0.9).float()
    model = build_model("phiseg", image_size=32, in_channels=1, level_loss_weight=0.5)
    lam = 2.0
    handler = TopKLikelihood(0.02, deterministic=True, recon_scale=lam)
    with handler:
        tr = poutine.trace(model.model).get_trace(image, mask, recon_scale=lam)
    sites = [n for n, s in tr.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    assert sites[-1] == "mask" and len(sites) == 3  # mask_2, mask_3 and the full-resolution mask
    with torch.no_grad():
        full = poutine.trace(poutine.replay(model.model, trace=tr)).get_trace(image, mask, recon_scale=lam)
    recon, pixels = 0.0, 0.0
    for name in sites:
        ce = -full.nodes[name]["fn"].base_dist.log_prob(mask)
        keep = topk_pixels(ce, 0.02, deterministic=True)
        torch.testing.assert_close(tr.nodes[name]["fn"].log_prob(mask).detach(), -(ce * keep).sum((1, 2, 3)))
        w = 1.0 if name == "mask" else 0.5
        recon += w * float((ce * keep).sum()) / 2
        pixels += w * float(keep.sum()) / 2
    assert float(handler.recon) == pytest.approx(recon, rel=1e-5)
    assert handler.pixels_per_image == pytest.approx(pixels) and pixels == pytest.approx(2 * 20.0)


def test_geco_refuses_a_model_without_a_kl_term(tmp_path):
    """SSN's guide is its prior (KL = 0): GECO has nothing to trade, so fit and compare refuse it in
    one line (before: an AttributeError from the top-k on its mixture likelihood), and a
    default compare under GECO leaves it out."""
    from pyroseg.compare import compare_models, model_list

    with pytest.raises(UsageError, match=r"--objective geco: ssn has no KL term"):
        fit(_cfg(tmp_path, "ssn", 1, model="ssn"), pictures=False)
    assert not (tmp_path / "ssn" / "checkpoint.pt").exists()
    geco = FitConfig(objective="geco")
    assert "ssn" not in model_list(None, geco) and "prob_unet" in model_list(None, geco)
    assert "ssn" in model_list(None, FitConfig())
    with pytest.raises(UsageError, match="ssn has no KL term"):
        compare_models(geco, tmp_path / "cmp", models=["unet", "ssn"])
    assert not (tmp_path / "cmp" / "unet").exists()  # refused before anything was trained


def test_the_mean_constraint_scores_a_mixture_likelihood_whole():
    """A likelihood that is not a per-pixel Bernoulli (an ensemble's mixture) is counted whole
    by the mean constraint and refused by the top-k with one line."""
    from pyro import poutine

    from pyroseg.models import EnsembleModel

    unet = build_model("unet", image_size=32).hparams()
    ens = EnsembleModel(members=[{"name": "unet", "hparams": unet}] * 2, image_size=32)
    image, mask = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.9).float()
    counting = TopKLikelihood(None)
    with counting:
        tr = poutine.trace(ens.model).get_trace(image, mask)
    assert float(counting.recon) == pytest.approx(float(-tr.nodes["mask"]["fn"].log_prob(mask).detach().mean()), rel=1e-5)
    assert counting.pixels_per_image == 32 * 32
    with pytest.raises(UsageError, match="not a per-pixel Bernoulli"), TopKLikelihood(0.02):
        poutine.trace(ens.model).get_trace(image, mask)

