"""The model/guide pairs: sites, shapes, the beta scaling, sampling, and learning."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyroseg.errors import UsageError
from pyroseg.models import MODELS, build_model
from pyroseg.predict import elbo_terms

B, C, H = 3, 3, 32  # batch, channels, image size (32: the smallest the 4-level backbone allows)

#: latent site -> event shape at H = 32, for the default hyper-parameters
EXPECTED_LATENTS = {
    "unet": {},
    "vae": {"z": (24,)},
    "skip_vae": {"z": (24,)},
    "hvae": {"z_3": (16,), "z_2": (32,), "z_1": (64,)},
    "prob_unet": {"z": (6,)},
    # DeepMind's hierarchy: one channel at the four coarsest scales, down to a global 1x1 latent
    "hprob_unet": {"z_4": (1, 1, 1), "z_3": (1, 2, 2), "z_2": (1, 4, 4), "z_1": (1, 8, 8)},
    "ssn": {"eta": (20, H * H)},  # M = 20 draws of the H*W logits, given a mask
    "mc_dropout": {},
    # coarsest (2x2) first; the finest latent at 1/4 of the image (see pyroseg/models/phiseg.py)
    "phiseg": {"z_3": (2, H // 16, H // 16), "z_2": (2, H // 8, H // 8), "z_1": (2, H // 4, H // 4)},
}

#: observed sites beside "mask" when a mask is given: phiseg's per-level likelihoods
EXTRA_OBSERVED = {"phiseg": {"mask_2", "mask_3"}}

#: hyper-parameters that make the training loss the plain negative ELBO (recon + beta * sum KL),
#: which the generic beta / recon_scale tests check; phiseg's weighted loss has its own test
#: (tests/test_baselines.py)
PLAIN_ELBO = {"phiseg": {"level_loss_weight": 0, "exponential_weighting": False}}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, C, H, H, generator=g)
    mask = (torch.rand(B, 1, H, H, generator=g) > 0.8).float()
    return image, mask


def _traces(model, image, mask, **kw):
    guide_trace = poutine.trace(model.guide).get_trace(image, mask, **kw)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(image, mask, **kw)
    return guide_trace, model_trace


def _samples(trace):
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not n.startswith("batch")}


@pytest.mark.parametrize("name", list(MODELS))
def test_trace_has_exactly_the_expected_sites(name):
    model = build_model(name, image_size=H)
    image, mask = _batch()
    guide_trace, model_trace = _traces(model, image, mask)
    expected = EXPECTED_LATENTS[name]
    msites = _samples(model_trace)
    assert set(msites) == set(expected) | {"mask"} | EXTRA_OBSERVED.get(name, set())
    for extra in EXTRA_OBSERVED.get(name, ()):
        assert msites[extra]["is_observed"] and torch.equal(msites[extra]["value"], mask)
    assert tuple(model.latent_sites) == tuple(expected)  # declared in sampling order
    assert set(_samples(guide_trace)) == set(expected)  # the guide covers every latent, and nothing else
    for site, event in expected.items():
        for tr in (model_trace, guide_trace):
            fn = tr.nodes[site]["fn"]
            assert fn.batch_shape == (B,), (site, fn.batch_shape)
            assert fn.event_shape == event, (site, fn.event_shape)
            assert tr.nodes[site]["value"].shape == (B, *event)
    m = msites["mask"]
    assert m["is_observed"] and torch.equal(m["value"], mask)
    assert m["fn"].batch_shape == (B,) and m["fn"].event_shape == (1, H, H)
    # one batch plate, over dim -1, around every site
    for tr in (model_trace, guide_trace):
        for s in _samples(tr).values():
            assert [f.name for f in s["cond_indep_stack"]] == ["batch"]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, Trace_ELBO])
def test_elbo_is_finite_and_has_gradients(name, elbo):
    model = build_model(name, image_size=H)
    image, mask = _batch()
    loss = elbo().differentiable_loss(model.model, model.guide, image, mask)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", [n for n in MODELS if MODELS[n].latent_sites and not MODELS[n].guide_is_prior])
def test_beta_scales_exactly_the_kl_part(name):
    """With the noise fixed, loss(beta) = recon + beta * KL, so it is affine in beta
    with slope equal to the sum of the per-site KLs of elbo_terms."""
    model = build_model(name, image_size=H, **PLAIN_ELBO.get(name, {}))
    # move the posterior away from the prior so the KL is not ~0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image, mask = _batch()
    elbo = TraceMeanField_ELBO()

    def loss(beta):
        pyro.set_rng_seed(123)
        return float(elbo.differentiable_loss(model.model, model.guide, image, mask, beta=beta).detach())

    l0, l1, l03 = loss(0.0), loss(1.0), loss(0.3)  # beta = 0: poutine.mask drops the KL exactly
    pyro.set_rng_seed(123)
    terms = elbo_terms(model, image, mask)
    kl = sum(float(terms[f"kl_{s}"].sum()) for s in model.latent_sites)
    assert kl > 1e-3
    assert l1 - l0 == pytest.approx(kl, rel=1e-4, abs=1e-3)
    assert l03 == pytest.approx(l0 + 0.3 * kl, rel=1e-5, abs=1e-3)
    assert l0 == pytest.approx(float(terms["recon"].sum()), rel=1e-5)
    assert l1 == pytest.approx(float(terms["loss"].sum()), rel=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_recon_scale_scales_only_the_likelihood(name):
    model = build_model(name, image_size=H, **PLAIN_ELBO.get(name, {}))
    image, mask = _batch()
    elbo = TraceMeanField_ELBO()

    def loss(**kw):
        pyro.set_rng_seed(7)
        return float(elbo.differentiable_loss(model.model, model.guide, image, mask, **kw).detach())

    pyro.set_rng_seed(7)
    terms = elbo_terms(model, image, mask)
    recon, kl = float(terms["recon"].sum()), float((terms["loss"] - terms["recon"]).sum())
    assert loss(recon_scale=2.5) == pytest.approx(2.5 * recon + kl, rel=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_sample_is_the_models_test_time_predictive(name):
    """``sample`` draws z from the model's test-time source (the guide for the VAE
    family, the prior for the Probabilistic U-Nets) and returns the mask site's
    probabilities: with the same seed, exactly those of a Pyro trace."""
    model = build_model(name, image_size=H).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image, _ = _batch()
    pyro.set_rng_seed(11)
    with torch.no_grad():
        if model.sample_from == "q(z|x)":
            guide_trace = poutine.trace(model.guide).get_trace(image, None)
            trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(image, None)
        else:
            trace = poutine.trace(model.model).get_trace(image, None)
        fn = trace.nodes["mask"]["fn"]
        if model.guide_is_prior:  # ssn: a mixture of M = 1 Bernoulli map without a mask
            assert fn.component_distribution.batch_shape == (B, 1)
            expected = fn.component_distribution.base_dist.probs[:, 0]
        else:
            expected = fn.base_dist.probs  # (B, 1, H, W)
        pyro.set_rng_seed(11)
        got = model.sample(image, 1)
    assert got.shape == (1, B, 1, H, H)
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_sample_shapes_and_diversity(name):
    model = build_model(name, image_size=H).eval()
    # hprob_unet: 6 levels of residual blocks without normalisation saturate the logits at 0.1
    noise = 0.01 if name == "hprob_unet" else 0.1
    with torch.no_grad():  # a random, non-degenerate posterior/prior
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
        image, _ = _batch()
        s = model.sample(image, 5)
    assert s.shape == (5, B, 1, H, H)
    assert ((s >= 0) & (s <= 1)).all()
    spread = (s - s[:1]).abs().max()
    if model.has_latent:
        assert spread > 1e-4, "samples of a latent model must differ"
    else:
        assert spread == 0, "a model without a latent gives one answer"
    assert model.predict(image, 4).shape == (B, 1, H, H)


@pytest.mark.parametrize("name", list(MODELS))
def test_predict_at_mean_is_a_sample_with_every_draw_at_its_mean(name, monkeypatch):
    """The mean-z point prediction is what ``sample`` gives when every Normal draw (and
    SSN's low-rank logit draw) returns its mean and MC dropout drops nothing."""
    from pyroseg.models.mc_dropout import AlwaysDropout

    model = build_model(name, image_size=H).eval()
    noise = 0.01 if name == "hprob_unet" else 0.1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    image, _ = _batch()
    got = model.predict_at_mean(image)
    assert got.shape == (B, 1, H, H)
    if model.has_latent:  # the test would pass vacuously if the samples did not differ from it
        assert (model.sample(image, 1)[0] - got).abs().max() > 1e-4
    monkeypatch.setattr(dist.Normal, "rsample", lambda self, shape=(): self.loc.expand(self.shape(shape)))
    monkeypatch.setattr(dist.LowRankMultivariateNormal, "rsample",
                        lambda self, shape=(): self.loc.expand(self.shape(shape)))
    monkeypatch.setattr(AlwaysDropout, "forward", lambda self, x: x)
    with torch.no_grad():
        at_mean = model.sample(image, 2)
    torch.testing.assert_close(at_mean[0], got, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(at_mean[1], got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["prob_unet", "hprob_unet", "phiseg"])
def test_guide_needs_the_mask(name):
    model = build_model(name, image_size=H)
    with pytest.raises(ValueError, match="needs the mask"):
        model.guide(*_batch()[:1])


def test_unknown_model_and_bad_sizes_are_usage_errors():
    with pytest.raises(UsageError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(UsageError, match="power of two"):
        build_model("unet", image_size=48)
    with pytest.raises(UsageError, match="too small"):
        build_model("unet", image_size=16)


def test_hparams_rebuild_the_same_architecture():
    for name in MODELS:
        m = build_model(name, image_size=H)
        m2 = build_model(name, **m.hparams())
        assert m.num_params == m2.num_params
        m2.load_state_dict(m.state_dict())


def test_models_share_the_backbone_size():
    """Fair comparison: every model's size is within a small factor of the U-Net's.
    Except the HPU-Net at its published depth (3 residual blocks of 3 convolutions per
    level, down to 1x1: most of its weights sit at the 128-wide coarse levels, where
    they cost little time); its ``v1`` layout is on the shared backbone."""
    sizes = {n: build_model(n, image_size=64).num_params for n in MODELS if n != "hprob_unet"}
    sizes["hprob_unet v1"] = build_model("hprob_unet", image_size=64, layout="v1").num_params
    assert max(sizes.values()) < 4 * sizes["unet"], sizes


def test_hprob_unet_layouts():
    """The default follows DeepMind's hierarchy scaled to the image (85 latent units
    at any size, the coarsest a global 1x1 latent); ``layout=v1`` is pyroseg's earlier
    layout (2 channels at 1/8, 1/4, 1/2 of the image); each field can be overridden."""
    from pyroseg.collapse import latent_units

    ref = build_model("hprob_unet", image_size=64)
    assert ref.latent_sites == ("z_4", "z_3", "z_2", "z_1")
    assert ref.core_widths == (16, 32, 64, 128, 128, 128, 128)  # 64, 32, ..., 1 pixels
    assert latent_units(ref) == {"z_4": 1, "z_3": 4, "z_2": 16, "z_1": 64}
    blocks = ref.prior_core.encoder.levels[0]
    assert len(blocks) == 3 and sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in blocks[0].modules()) == 3
    assert len(ref.stitch.blocks) == 7 - 1 - 4  # levels after the last latent scale
    v1 = build_model("hprob_unet", image_size=64, layout="v1")
    assert latent_units(v1) == {"z_3": 2 * 8 * 8, "z_2": 2 * 16 * 16, "z_1": 2 * 32 * 32}
    custom = build_model("hprob_unet", image_size=64, latent_scales=2, latent_channels=3, blocks_per_level=1)
    assert latent_units(custom) == {"z_2": 3, "z_1": 3 * 4}
    assert build_model("hprob_unet", **custom.hparams()).hparams() == custom.hparams()


@pytest.mark.parametrize("arg, match", [
    ({"layout": "deepmind"}, "--model-arg layout=deepmind: expected one of reference, v1"),
    ({"latent_scales": 6}, "--model-arg latent_scales=6: expected 1 to 5"),
    ({"latent_channels": 0}, "--model-arg latent_channels=0: expected at least 1"),
    ({"blocks_per_level": 0}, "--model-arg blocks_per_level=0"),
    ({"layout": "v1", "blocks_per_level": 3}, "layout v1 has one block"),
    ({"posterior_init_scale": 0}, "--model-arg posterior_init_scale=0"),
])
def test_hprob_unet_bad_hyper_parameters_are_one_line_usage_errors(arg, match):
    with pytest.raises(UsageError, match=match) as e:
        build_model("hprob_unet", image_size=H, **arg)
    assert "\n" not in str(e.value)


#: bound on KL / reconstruction at the first step (64x64, batch 2, a lesion share of 5 %)
STEP0_KL_RATIO = 0.5


@pytest.mark.parametrize("name", [n for n in MODELS if n != "unet"])
def test_first_step_kl_is_not_a_multiple_of_the_reconstruction(name):
    """An initialisation whose KL dwarfs the reconstruction erases the latents before
    the decoder learns to use them (hprob_unet's earlier v1 layout: KL 5,000 vs 870 nats).
    Measured at 64x64: vae 0.05, skip_vae 0.05, hvae 0.23, prob_unet 0.01,
    hprob_unet 0.001 (v1 layout with its old posterior scale 0.1: 5.7)."""
    from pyroseg.objective import SiteELBO

    g = torch.Generator().manual_seed(0)
    image, mask = torch.rand(2, C, 64, 64, generator=g), (torch.rand(2, 1, 64, 64, generator=g) < 0.05).float()
    torch.manual_seed(0)
    model = build_model(name, image_size=64)
    _, terms = SiteELBO().differentiable_loss_and_terms(model.model, model.guide, image, mask)
    kl = sum(float(v.mean()) for k, v in terms.items() if k.startswith("kl_"))
    assert 0 <= kl <= STEP0_KL_RATIO * float(terms["recon"].mean()), (kl, float(terms["recon"].mean()))
    if name == "hprob_unet":  # the old initialisation, still reachable, fails the bound
        torch.manual_seed(0)
        old = build_model(name, image_size=64, layout="v1", posterior_init_scale=0.1)
        _, terms = SiteELBO().differentiable_loss_and_terms(old.model, old.guide, image, mask)
        kl = sum(float(v.mean()) for k, v in terms.items() if k.startswith("kl_"))
        assert kl > 3 * float(terms["recon"].mean())


def test_conv_of_upsampled_input_without_upsampling():
    """hprob_unet's sampling computes conv3x3(up2(x)) as four 2x2 phase convolutions."""
    from pyroseg.models.hprob_unet import conv3x3_of_up2

    x, w = torch.randn(2, 5, 6, 7), torch.randn(4, 5, 3, 3)
    ref = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    torch.testing.assert_close(conv3x3_of_up2(x, w), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("widths", [(16, 32, 64, 128), (8, 16, 32, 64, 128)])
def test_hprob_unet_fast_sample_equals_the_reference(widths):
    """``sample`` (layout v1) shares the z-independent work between samples: same draws, same
    probabilities (to float rounding) as running the decoder on repeated features."""
    model = build_model("hprob_unet", image_size=H if len(widths) == 4 else 64, widths=widths, layout="v1").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        image = torch.rand(3, 3, model.image_size, model.image_size)
        pyro.set_rng_seed(5)
        fast = model.sample(image, 6)
        pyro.set_rng_seed(5)
        ref = model.sample_reference(image, 6)
    assert fast.shape == (6, 3, 1, model.image_size, model.image_size)
    assert (fast - fast[:1]).abs().max() > 1e-3  # the samples differ ...
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)  # ... exactly as the reference's do


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 2**10, 2**16, 2**30])
def test_prob_unet_fcomb_pixels_last_equals_forward(chunk, grad):
    """``sample``'s f_comb (matrix products over pixels, samples in chunks) computes
    the training path's f_comb, whatever the chunk size (S not a multiple of it), on
    the CPU path (features as rows, reused buffers) and the autograd path (pixels as
    rows, the GPU's layout), whose gradients are the training path's."""
    from pyroseg.models.prob_unet import FComb

    fcomb = FComb(feat_ch=8, latent_dim=3, hidden=5)
    with torch.no_grad():
        for p in fcomb.parameters():
            p.add_(0.3 * torch.randn_like(p))
    u, z = torch.randn(2, 8, 6, 7), torch.randn(5, 2, 3)
    with torch.set_grad_enabled(grad):
        ref = fcomb(u, z)
        got = fcomb.forward_pixels_last(u, z, chunk_elems=chunk)
    assert got.shape == ref.shape == (5, 2, 1, 6, 7) and got.is_contiguous()
    assert got.requires_grad == grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if grad:
        w = torch.randn_like(ref)
        g_ref = torch.autograd.grad((ref * w).sum(), list(fcomb.parameters()))
        g_got = torch.autograd.grad((got * w).sum(), list(fcomb.parameters()))
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prob_unet_sample_same_draws_as_reference():
    """``sample`` = sigmoid of the training path's f_comb on the same prior draws, under
    inference_mode (the CPU fast path) as under autograd."""
    model = build_model("prob_unet", image_size=H).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    image = torch.rand(3, 3, H, H)
    for ctx in (torch.inference_mode, torch.enable_grad):
        with ctx():
            pyro.set_rng_seed(3)
            got = model.sample(image, 37)
            pyro.set_rng_seed(3)
            loc, scale = model.prior_net(image)
            z = dist.Normal(loc, scale).rsample((37,))
            ref = torch.sigmoid(model.fcomb(model.unet.features(image), z))
        assert (got - got[:1]).abs().max() > 1e-4
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_prob_unet_dropout_regularises_in_training_and_test_dropout_keeps_it_in_samples():
    """``dropout=p``: the backbone's dropout is on in training and off in ``eval()``, so the
    samples are the plain model's; ``test_dropout=true``: each sample is one prior ``z`` and
    one dropout mask (the U-Net run per sample, in chunks), and ``predict_at_mean`` is the
    network without dropout at the prior mean."""
    plain = build_model("prob_unet", image_size=H)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    image = torch.rand(2, 3, H, H)
    train_only = build_model("prob_unet", image_size=H, dropout=0.5)
    kept = build_model("prob_unet", image_size=H, dropout="0.5", test_dropout="true")
    for m in (train_only, kept):
        with torch.no_grad():  # dropout adds no parameters, only a level of nesting to their names
            mine, theirs = m.state_dict().values(), plain.state_dict().values()
            assert len(mine) == len(theirs)
            for a, b in zip(mine, theirs):
                a.copy_(b)
        assert m.hparams()["dropout"] == 0.5
    assert kept.hparams()["test_dropout"] is True and train_only.hparams()["test_dropout"] is False
    with torch.no_grad():
        train_only.train()
        a, b = train_only.unet.features(image), train_only.unet.features(image)
        assert float((a - b).abs().max()) > 1e-3  # training: a fresh dropout mask per pass
        plain.eval(), train_only.eval(), kept.eval()
        pyro.set_rng_seed(1)
        ref = plain.sample(image, 9)
        pyro.set_rng_seed(1)
        torch.testing.assert_close(train_only.sample(image, 9), ref)  # eval(): no dropout
        pyro.set_rng_seed(1)
        loc, scale = kept.prior_net(image)
        z = dist.Normal(loc, scale).rsample((9,))
        kept.sample_chunk = 4  # 9 samples x 2 images in chunks of 4 images
        pyro.set_rng_seed(1)
        got = kept.sample(image, 9)
        assert got.shape == ref.shape == (9, 2, 1, H, H)
        same_z = torch.sigmoid(plain.fcomb(plain.unet.features(image), z))  # the same z, no dropout
        assert float((got - same_z).abs().amax(dim=(1, 2, 3, 4)).min()) > 1e-3  # every sample its own mask
        torch.testing.assert_close(kept.predict_at_mean(image), plain.predict_at_mean(image))
    with pytest.raises(UsageError, match="test_dropout=true: expected dropout > 0"):
        build_model("prob_unet", image_size=H, test_dropout=True)
