"""Collapse diagnostics: active units, the prior-mean intervention, the report and the picture."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from pyroseg.collapse import FixSites, active_units, collapse_report, latent_units, predict_probs
from pyroseg.data.core import SegData
from pyroseg.models import build_model

H = 32


def test_active_units_counts_dimensions_whose_mean_varies_across_inputs():
    g = torch.Generator().manual_seed(0)
    n = 2000
    means = torch.stack([
        torch.full((n,), 3.0),  # constant: inactive, however far from 0
        torch.randn(n, generator=g) * 0.5**0.5,  # variance 0.5: active
        torch.randn(n, generator=g) * 0.05,  # variance 0.0025: inactive
        torch.randn(n, generator=g) * 0.2,  # variance 0.04: active
    ], dim=1)
    n_active, var = active_units(means)
    assert n_active == 2
    torch.testing.assert_close(var, torch.tensor([0.0, 0.5, 0.0025, 0.04]), rtol=0.1, atol=1e-4)
    assert active_units(means[:1])[0] == 0


def test_fix_sites_sets_a_site_to_its_conditional_mean_and_keeps_it_latent():
    model = build_model("hvae", image_size=H)
    image = torch.rand(3, 3, H, H)
    tr = poutine.trace(FixSites({"z_2"})(model.model)).get_trace(image, None)
    z2 = tr.nodes["z_2"]
    assert not z2["is_observed"]
    torch.testing.assert_close(z2["value"], z2["fn"].mean)  # the mean of p(z_2 | z_3), z_3 as drawn
    assert not torch.allclose(tr.nodes["z_3"]["value"], tr.nodes["z_3"]["fn"].mean)  # z_3 was drawn
    given = torch.ones(3, 16)
    tr = poutine.trace(FixSites(values={"z_3": given})(model.model)).get_trace(image, None)
    assert torch.equal(tr.nodes["z_3"]["value"], given)


def test_prior_mean_of_the_vae_is_zero_so_every_image_gets_decoder_of_zero():
    model = build_model("vae", image_size=H).eval()
    image = torch.rand(3, 3, H, H)
    probs = predict_probs(model, image, num_samples=2, prior_mean="z")  # (S, B, 1, H, W)
    expected = torch.sigmoid(model.mask_logits(torch.zeros(1, model.latent_dim)))  # (1, 1, H, W)
    torch.testing.assert_close(probs, expected.expand_as(probs))
    drawn = predict_probs(model, image, num_samples=2)
    assert not torch.allclose(drawn[0], drawn[1])  # z from q(z | x): samples differ


def test_prior_mean_of_the_prob_unet_is_the_prior_nets_mean():
    model = build_model("prob_unet", image_size=H).eval()
    with torch.no_grad():
        model.prior_net.head.proj.weight.normal_(0, 0.5)  # a prior net that depends on the image
    image = torch.rand(2, 3, H, H)
    probs = predict_probs(model, image, num_samples=3, prior_mean="z")
    with torch.no_grad():
        loc, _ = model.prior_net(image)
        expected = torch.sigmoid(model.fcomb(model.unet.features(image), loc.unsqueeze(0)))  # (1, B, 1, H, W)
    torch.testing.assert_close(probs, expected.expand_as(probs), rtol=1e-5, atol=1e-6)


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, H, H, generator=g) * 255).to(torch.uint8).numpy()
    masks = torch.zeros(n, 1, H, H, dtype=torch.uint8)
    masks[: n // 2, :, 8:20, 10:22] = 1
    return SegData(images=images, masks=masks.numpy(), patients=np.array([f"p{i // 4}" for i in range(n)]),
                   slice_numbers=np.arange(n), source="test")


def test_a_disconnected_latent_shows_no_active_units_and_no_effect():
    """A VAE whose q(z|x) ignores x and whose decoder ignores z: 0 active units,
    no change when z is replaced by its prior mean. Then a q(z|x) that moves with
    x: every unit is active."""
    data = _data()
    model = build_model("vae", image_size=H).eval()
    with torch.no_grad():
        model.q_z.proj.weight.zero_()  # loc = bias: the same for every image
        model.stem.fc[0].weight.zero_()  # decoder input does not depend on z
    rep = collapse_report(model, data, num_samples=2, batch_size=5)
    assert rep == {"au_z": 0, "units_z": 24, "dice_change_z": 0.0, "effect_z": 0.0}
    with torch.no_grad():
        model.q_z.proj.weight[:24].normal_(0, 5.0)
    assert collapse_report(model, data, num_samples=2)["au_z"] == 24


def test_the_effect_uses_common_random_numbers_so_an_unused_site_has_none():
    """hvae whose z_3 does not reach the top-down state, z_2 and z_1 drawn with a
    large scale (the prediction changes from draw to draw): setting z_3 to its prior
    mean must change nothing, because z_2 and z_1 get the same random numbers in
    both predictions. With independent draws this z_3 showed an effect of 0.66."""
    pyro.set_rng_seed(0)
    model = build_model("hvae", image_size=H).eval()
    with torch.no_grad():
        model.top_down["in_3"].weight.zero_()
        for q in (model.q_2, model.q_1):
            q.proj.bias[q.proj.bias.shape[0] // 2:] = 3.0  # log-scale: wide posteriors
        model.out.bias.zero_()  # logits around 0: thresholding at 0.5 follows the draws
    rep = collapse_report(model, _data(), num_samples=2, batch_size=6)
    assert rep["effect_z_3"] == 0.0 and rep["dice_change_z_3"] == 0.0
    assert rep["effect_z_2"] > 0.1 and rep["effect_z_1"] > 0.1  # the drawn sites do change it
    with torch.no_grad():
        model.top_down["in_3"].weight.normal_(0, 1.0)
    assert collapse_report(model, _data(), num_samples=2, batch_size=6)["effect_z_3"] > 0.1


def test_a_used_latent_changes_the_prediction_when_set_to_its_prior_mean():
    """prob_unet whose z decides the mask: a large z weight in f_comb. Setting z to
    the prior mean (0 at init) changes the prediction: effect > 0."""
    pyro.set_rng_seed(0)
    data = _data()
    model = build_model("prob_unet", image_size=H).eval()
    with torch.no_grad():
        model.fcomb.z_in.weight.fill_(0.0)
        model.fcomb.z_in.weight[:, 0] = 4.0  # the first coordinate of z switches hidden units on
        model.fcomb.mid.weight.copy_(torch.eye(16)[:, :, None, None])
        model.fcomb.out.weight.fill_(1.0)
    rep = collapse_report(model, data, num_samples=1)
    assert rep["effect_z"] > 0.1
    assert latent_units(model) == {"z": 6}
    hp = build_model("hprob_unet", image_size=H)
    assert latent_units(hp) == {"z_4": 1, "z_3": 2 * 2, "z_2": 4 * 4, "z_1": 8 * 8}


def test_diagnostic_indices_are_a_fixed_even_subset():
    from pyroseg.collapse import diagnostic_indices

    assert diagnostic_indices(5, None).tolist() == [0, 1, 2, 3, 4] and diagnostic_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert diagnostic_indices(10, 4).tolist() == [0, 3, 6, 9]  # linspace(0, 9, 4) = 0, 3, 6, 9
    assert diagnostic_indices(100, 64).tolist() == diagnostic_indices(100, 64).tolist()
    assert len(diagnostic_indices(100, 64)) == 64 and diagnostic_indices(100, 64)[-1] == 99


def test_collapse_report_on_a_subset_equals_the_report_of_those_slices():
    """``max_slices`` looks at the evenly spaced slices only: the same numbers as the
    report of a data set made of those slices, with the same draws."""
    data = _data(n=12)
    model = build_model("hvae", image_size=H).eval()
    keep = [0, 4, 7, 11]  # diagnostic_indices(12, 4)
    sub = SegData(images=data.images[keep], masks=data.masks[keep], patients=data.patients[keep],
                  slice_numbers=data.slice_numbers[keep], source="test")
    pyro.set_rng_seed(3)
    a = collapse_report(model, data, num_samples=2, batch_size=3, max_slices=4)
    pyro.set_rng_seed(3)
    b = collapse_report(model, sub, num_samples=2, batch_size=3)
    assert a == b and set(a) == {f"{k}_{s}" for k in ("au", "units", "dice_change", "effect") for s in model.latent_sites}


@pytest.mark.slow
def test_latent_scales_grid_draws_a_png(tmp_path):
    from pyroseg.plots import latent_scales_grid

    model = build_model("hvae", image_size=H)
    png = latent_scales_grid(model, _data(), tmp_path / "l.png", n_images=2, num_samples=2)
    assert png.stat().st_size > 5000


def test_test_time_z_is_the_typed_source_of_z_and_tta_forwards_it():
    """Code acts on ``test_time_z``; ``sample_from`` is only words. Every built-in model's
    ``test_time_z`` says "prior" exactly where its words said ``p(z|x)``."""
    from pyroseg.models import MODELS
    from pyroseg.tta import TestTimeAugmentation

    expected = {"prob_unet": "prior", "hprob_unet": "prior", "phiseg": "prior", "vae": "guide", "skip_vae": "guide",
                "hvae": "guide", "ssn": "guide", "unet": "none", "mc_dropout": "none"}
    for name, cls in MODELS.items():
        assert cls.test_time_z in ("prior", "guide", "none"), name
        assert (cls.test_time_z == "prior") == (cls.sample_from == "p(z|x)"), name
        if name in expected:
            assert cls.test_time_z == expected[name], name
    for name in ("prob_unet", "vae", "unet"):
        tta = TestTimeAugmentation(build_model(name, image_size=H))
        assert tta.test_time_z == MODELS[name].test_time_z and tta.sample_from.endswith(", 4 flips")


def test_a_model_that_names_its_z_source_only_in_words_gets_test_time_z():
    """A model written before ``test_time_z`` (``sample_from`` only) keeps working; one that
    sets ``test_time_z`` is taken at its word, whatever ``sample_from`` says."""
    from pyroseg.models.base import SegModel

    class Old(SegModel):
        latent_sites = ("z",)
        sample_from = "p(z|x)"

    class OldVAE(SegModel):
        latent_sites = ("z",)
        sample_from = "q(z|x)"

    class New(SegModel):
        latent_sites = ("z",)
        sample_from = "the prior net, p(z | x)"
        test_time_z = "prior"

    assert (Old.test_time_z, OldVAE.test_time_z, New.test_time_z) == ("prior", "guide", "prior")


def test_collapsed_sites_live_in_collapse_and_compare_re_exports_them():
    from pyroseg import collapse, compare

    assert compare.collapsed_sites is collapse.collapsed_sites
    assert (compare.COLLAPSE_NATS, compare.COLLAPSE_EFFECT) == (collapse.COLLAPSE_NATS, collapse.COLLAPSE_EFFECT)
    assert collapse.collapsed_sites({"kl_z": 0.05, "kl_w": 3.0, "au_w": 2, "effect_w": 0.2}) == "z"
    assert collapse.collapsed_sites({"dice_all": 1.0}) == "n/a"
