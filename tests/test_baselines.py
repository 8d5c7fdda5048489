"""The baselines: SSN's loss is the paper's, MC dropout samples dropout masks,
test-time augmentation flips, deep ensembles join runs; the hyper-parameter checks."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyroseg.cli.main import cli

from pyroseg.config import FitConfig
from pyroseg.errors import UsageError
from pyroseg.evaluate import evaluate_run
from pyroseg.models import EnsembleModel, build_model
from pyroseg.models.base import positive_int, positive_ints, rate
from pyroseg.objective import SiteELBO
from pyroseg.predict import elbo_terms
from pyroseg.runs import load_run
from pyroseg.train import fit
from pyroseg.tta import FLIPS, TestTimeAugmentation

B, C, H = 2, 3, 32


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, H, generator=g), (torch.rand(B, 1, H, H, generator=g) > 0.7).float()


def _perturbed(name, **kw):
    model = build_model(name, image_size=H, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------ ssn


def _paper_loss(eta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference code's StochasticSegmentationNetworkLossMCIntegral, per image, for one
    class: ``eta (B, M, HW)``, ``mask (B, 1, H, W)`` -> ``-(logsumexp_m log p(y | eta_m) - log M)``."""
    m = eta.shape[1]
    y = mask.reshape(mask.shape[0], 1, -1).expand_as(eta)
    log_prob = -F.binary_cross_entropy_with_logits(eta, y, reduction="none").sum(-1)  # (B, M)
    return -(torch.logsumexp(log_prob, dim=1) - math.log(m))


@pytest.mark.parametrize("num_mc,antithetic", [(1, False), (3, False), (20, False), (20, True)])
def test_ssn_loss_is_the_papers_monte_carlo_integral(num_mc, antithetic):
    """The shared objective's loss (value and gradient) is the paper's Eq. 5 on the same draws."""
    model = _perturbed("ssn", num_mc_samples=num_mc, antithetic=antithetic)
    image, mask = _batch()
    pyro.set_rng_seed(3)
    loss, terms = SiteELBO().differentiable_loss_and_terms(model.model, model.guide, image, mask)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    pyro.set_rng_seed(3)  # the same draws of eta, from the guide alone
    eta = poutine.trace(model.guide).get_trace(image, mask).nodes["eta"]["value"]
    assert eta.shape == (B, num_mc, H * H)
    ref = _paper_loss(eta, mask)
    torch.testing.assert_close(terms["recon"], ref.detach(), rtol=1e-5, atol=1e-4)
    assert float(terms["kl_eta"].abs().max()) == 0.0  # the guide is the prior: exactly 0
    torch.testing.assert_close(loss, ref.sum(), rtol=1e-5, atol=1e-4)
    ref.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    if num_mc > 1:  # log-mean-exp, not the mean of the logs (Jensen: strictly smaller loss)
        with torch.no_grad():
            mean_of_logs = F.binary_cross_entropy_with_logits(eta, mask.reshape(B, 1, -1).expand_as(eta),
                                                              reduction="none").sum(-1).mean(1)
            assert float(ref.sum().detach()) < float(mean_of_logs.sum()) - 1e-3


def test_ssn_draws_antithetic_pairs_by_default_as_the_reference():
    """The loss's M = 20 draws are 10 draws and their mirrors about the mean (the reference's
    fixed_re_parametrization_trick); antithetic=false: 20 independent draws; an odd M is refused."""
    image, mask = _batch()
    for antithetic in (True, False):
        model = _perturbed("ssn", **({} if antithetic else {"antithetic": False}))
        eta = poutine.trace(model.guide).get_trace(image, mask).nodes["eta"]["value"]  # (B, 20, HW)
        mu = model.logit_distribution(image).loc.unsqueeze(1)
        mirrored = (eta[:, :10] + eta[:, 10:] - 2 * mu).abs().max()
        assert (float(mirrored) < 1e-4) == antithetic
    assert _perturbed("ssn").hparams()["antithetic"] is True
    with pytest.raises(UsageError, match="num_mc_samples=3: expected an even number"):
        _perturbed("ssn", num_mc_samples=3)


def test_ssn_falls_back_to_independent_normals_for_an_image_torch_cannot_factorise(caplog):
    """d at epsilon under a large, rank-one W: the capacitance loses its identity in float32 and
    torch's LowRankMultivariateNormal raises. low_rank_normal zeroes W for that image only (the
    reference: for the whole batch), and the model logs it once instead of crashing training."""
    import logging

    import pyro.distributions as dist

    from pyroseg.models.ssn import low_rank_normal

    d = 256
    loc = torch.zeros(2, d)
    cov_diag = torch.full((2, d), 1e-5)
    cov_factor = torch.randn(2, d, 4) * 0.1
    cov_factor[1] = 1e3 * torch.ones(d, 1)  # image 1: four equal huge columns
    with pytest.raises(torch.linalg.LinAlgError):
        dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)
    p, fallbacks = low_rank_normal(loc, cov_factor, cov_diag)
    assert fallbacks == 1
    assert torch.equal(p.cov_factor[0], cov_factor[0]) and not p.cov_factor[1].any()
    assert torch.isfinite(p.log_prob(p.rsample((3,)))).all()

    model = build_model("ssn", image_size=32)
    with torch.no_grad():
        model.log_cov_diag_head.weight.zero_()
        model.log_cov_diag_head.bias.fill_(-50.0)  # d = epsilon
        model.cov_factor_head.weight.zero_()
        model.cov_factor_head.bias.fill_(1e3)  # W: rank one, huge
    with caplog.at_level(logging.WARNING, logger="pyroseg.models.ssn"):
        for _ in range(2):
            p = model.logit_distribution(torch.randn(2, model.in_channels, 32, 32))
    assert not p.cov_factor.any()
    assert sum("not invertible" in r.getMessage() for r in caplog.records) == 1


def test_ssn_draws_survive_a_copy_that_does_not_factorise_again(monkeypatch):
    """The M-draw distribution reuses the checked factor of the per-image one; a borderline image
    whose capacitance factorised once can fail in the expanded batch layout (seen on LGG: Cholesky
    of batch element 1220 mid-run). Then each copy is checked, and no error reaches training."""
    import pyro.distributions as dist

    from pyroseg.models import ssn

    base, _ = ssn.low_rank_normal(torch.zeros(2, 16), torch.randn(2, 16, 3) * 0.1, torch.ones(2, 16))
    real = dist.LowRankMultivariateNormal
    calls = []

    def flaky(loc, cov_factor, cov_diag, *a, **k):  # the expanded (4-D factor) layout fails once
        calls.append(cov_factor.dim())
        if cov_factor.dim() == 4 and calls.count(4) == 1:
            raise torch.linalg.LinAlgError("linalg.cholesky: (Batch element 5): not positive-definite")
        return real(loc, cov_factor, cov_diag, *a, **k)

    monkeypatch.setattr(ssn.dist, "LowRankMultivariateNormal", flaky)
    for antithetic in (False, True):
        calls.clear()
        d = ssn._iid(base, 4, antithetic=antithetic)
        assert calls == [4, 4]  # failed, then low_rank_normal's checked copies
        assert d.batch_shape == (2,) and d.event_shape == (4, 16)
        assert torch.isfinite(d.log_prob(d.rsample())).all()


def test_ssn_pyro_trace_elbo_and_elbo_terms_agree():
    model = _perturbed("ssn")
    image, mask = _batch()
    pyro.set_rng_seed(1)
    ours = SiteELBO().differentiable_loss(model.model, model.guide, image, mask)
    pyro.set_rng_seed(1)
    theirs = Trace_ELBO().differentiable_loss(model.model, model.guide, image, mask)  # log q - log p = 0
    pyro.set_rng_seed(1)
    terms = elbo_terms(model, image, mask)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours.detach(), terms["loss"].sum().detach())
    assert float(terms["kl_eta"].abs().max()) == 0.0


def test_ssn_samples_follow_the_low_rank_normal():
    """``sample``: one network pass, then draws whose logits have the predicted mean and
    covariance ``W W^T + diag(d)``, correlated across pixels through W."""
    model = _perturbed("ssn", rank=2).eval()
    image = torch.rand(1, C, H, H)
    with torch.no_grad():
        p = model.logit_distribution(image)
        probs = model.sample(image, 20000)
    assert probs.shape == (20000, 1, 1, H, H)
    eta = torch.logit(probs.double().clamp(1e-12, 1 - 1e-12)).reshape(20000, -1)
    pix = torch.tensor([0, 5, 300, 777])
    mean, cov = eta[:, pix].mean(0), torch.cov(eta[:, pix].T)
    w = p.cov_factor[0, pix].double()
    expected = w @ w.T + torch.diag(p.cov_diag[0, pix].double())
    torch.testing.assert_close(mean, p.loc[0, pix].double(), atol=0.05 * float(expected.diag().max().sqrt()), rtol=0)
    torch.testing.assert_close(cov, expected, atol=0.05 * float(expected.diag().max()), rtol=0)
    assert float(expected[0, 1].abs()) > 0.05 * float(expected.diag().min())  # off-diagonal: the low rank


def test_ssn_one_network_pass_per_step():
    model = build_model("ssn", image_size=H)
    calls = []
    model.unet.register_forward_hook(lambda *a: calls.append(1))
    h = model.unet.decoder.register_forward_hook(lambda *a: calls.append(1))
    image, mask = _batch()
    SiteELBO().differentiable_loss(model.model, model.guide, image, mask)
    h.remove()
    assert len(calls) == 1  # the decoder ran once: the model used the guide's distribution


# ----------------------------------------------------------------------------------- mc_dropout


def test_mc_dropout_samples_one_mask_each_and_rate_zero_is_a_unet():
    model = _perturbed("mc_dropout").eval()  # eval(): dropout stays on
    image, _ = _batch()
    with torch.no_grad():
        s = model.sample(image, 6)
        assert float((s[1:] - s[:1]).abs().amax(dim=(1, 2, 3, 4)).min()) > 1e-4  # every sample its own mask
        off = build_model("mc_dropout", image_size=H, dropout=0.0)
        off.load_state_dict(model.state_dict())
        s0 = off.sample(image, 3)
        ref = torch.sigmoid(off.unet(image))  # the U-Net's forward, the dropout layers the identity
        on = torch.sigmoid(model.unet(image))
    torch.testing.assert_close(s0, ref.expand(3, *ref.shape), rtol=1e-5, atol=1e-6)
    assert float((on - ref).abs().max()) > 1e-3  # with the rate on, the same weights give another map
    assert model.num_draws(16) == 16 and build_model("unet", image_size=H).num_draws(16) == 1


def test_mc_dropout_sample_chunks_do_not_change_the_draws():
    model = _perturbed("mc_dropout").eval()
    image, _ = _batch()
    with torch.no_grad():
        pyro.set_rng_seed(0)
        model.sample_chunk = 1
        a = model.sample(image, 5)
        pyro.set_rng_seed(0)
        model.sample_chunk = 10**6
        b = model.sample(image, 5)
    assert a.shape == b.shape == (5, B, 1, H, H)
    assert 0.0 < float((a - b).abs().max())  # other draws, same distribution: the means agree
    torch.testing.assert_close(a.mean(0), b.mean(0), atol=0.5, rtol=0)


# ------------------------------------------------------------------------------------------ tta


def test_tta_gives_a_unet_the_four_flipped_predictions():
    base = _perturbed("unet").eval()
    tta = TestTimeAugmentation(base)
    image, mask = _batch()
    with torch.no_grad():
        s = tta.sample(image, 8)
        assert tta.num_draws(16) == 4 and tta.has_latent
        for i, dims in enumerate(FLIPS):
            flipped = torch.flip(image, dims) if dims else image
            pred = torch.sigmoid(base.unet(flipped))
            torch.testing.assert_close(s[i], torch.flip(pred, dims) if dims else pred)
            torch.testing.assert_close(s[i + 4], s[i])
        assert float((s[1] - s[0]).abs().max()) > 1e-4  # a U-Net is not flip-invariant: an uncertainty map
        # the ELBO terms are the base model's
        torch.testing.assert_close(elbo_terms(tta, image, mask)["loss"], elbo_terms(base, image, mask)["loss"])


def test_tta_spreads_a_latent_models_samples_over_the_flips():
    base = _perturbed("prob_unet").eval()
    tta = TestTimeAugmentation(base)
    with torch.no_grad():
        s = tta.sample(_batch()[0], 6)
    assert s.shape == (6, B, 1, H, H) and tta.num_draws(6) == 8
    assert float((s[4] - s[0]).abs().max()) > 1e-4  # two draws for the identity flip differ


# ------------------------------------------------------------------------------------ ensembles


def test_ensemble_samples_are_the_members_and_its_likelihood_the_mixture():
    members = [_perturbed("unet"), _perturbed("unet"), _perturbed("mc_dropout")]
    ens = EnsembleModel(members=[{"name": m.name, "hparams": m.hparams()} for m in members], image_size=H)
    for dst, src in zip(ens.members, members, strict=True):
        dst.load_state_dict(src.state_dict())
    ens.eval()
    image, mask = _batch()
    with torch.no_grad():
        s = ens.sample(image, 7)
        assert s.shape == (7, B, 1, H, H) and ens.num_draws(7) == 9
        for k in range(2):
            torch.testing.assert_close(s[k], torch.sigmoid(members[k].unet(image)))
            torch.testing.assert_close(s[k + 3], s[k])
        two = EnsembleModel(members=ens.member_docs[:2], image_size=H)
        two.members.load_state_dict(torch.nn.ModuleList(members[:2]).state_dict())
        assert two.num_draws(16) == 2  # deterministic members: one prediction each
        nll = elbo_terms(two, image, mask)["loss"]
        lp = torch.stack([-F.binary_cross_entropy_with_logits(m.unet(image), mask, reduction="none").sum((1, 2, 3))
                          for m in members[:2]])
        torch.testing.assert_close(nll, -(torch.logsumexp(lp, 0) - math.log(2)), rtol=1e-4, atol=1e-3)


def _ensemble_of(names):
    members = [_perturbed(n) for n in names]
    ens = EnsembleModel(members=[{"name": m.name, "hparams": m.hparams()} for m in members], image_size=H)
    for dst, src in zip(ens.members, members, strict=True):
        dst.load_state_dict(src.state_dict())
    return ens.eval()


def _which_member(ens, samples, image, dims=()):
    """For each sample ``(S, B, 1, H, W)`` (of ``image`` flipped by ``dims``), the deterministic member it is."""
    preds = [m.sample(torch.flip(image, dims) if dims else image, 1)[0] for m in ens.members]
    preds = [torch.flip(p, dims) if dims else p for p in preds]
    return [next(k for k, p in enumerate(preds) if torch.allclose(s, p)) for s in samples]


def test_tta_over_an_ensemble_uses_every_member_under_every_flip():
    """16 samples asked of TTA over 5 deterministic members: 20 draws, each member once per flip
    (before: 8 draws, members 0 and 1 only)."""
    ens = _ensemble_of(["unet"] * 5)
    tta = TestTimeAugmentation(ens)
    image = _batch()[0]
    n = tta.num_draws(16)
    assert n == 20
    with torch.no_grad():
        s = tta.sample(image, n)
        for f, dims in enumerate(FLIPS):
            assert sorted(_which_member(ens, s[f::4], image, dims)) == [0, 1, 2, 3, 4]
    # stochastic members: 4 per member for 16 asked, so 4 flips x 5 x ceil(4 / 5) = 20
    assert TestTimeAugmentation(_ensemble_of(["prob_unet"] * 5)).num_draws(16) == 20


def test_sampling_an_ensemble_weighs_its_members_alike():
    """``pyroseg sample`` rounds the count up so that every member gives as many samples."""
    from pyroseg.sampling import balanced_draws

    ens = _ensemble_of(["unet"] * 5)
    assert balanced_draws(ens, 16) == 20 and balanced_draws(ens, 5) == 5
    assert balanced_draws(build_model("unet", image_size=H), 16) == 16
    assert balanced_draws(build_model("prob_unet", image_size=H), 7) == 7
    assert balanced_draws(TestTimeAugmentation(build_model("unet", image_size=H)), 6) == 8
    image = _batch()[0]
    with torch.no_grad():
        used = _which_member(ens, ens.sample(image, 20), image)
    assert [used.count(k) for k in range(5)] == [4] * 5


def _tiny(out, init_seed, model="unet"):
    cfg = FitConfig(model=model, data="synthetic-ambiguous", out=str(out), image_size=H, epochs=1, batch_size=16,
                    synthetic_patients=6, synthetic_slices=4, widths=(8, 16, 32, 64), val_samples=1, device="cpu",
                    init_seed=init_seed, collapse_diagnostics=False)
    return fit(cfg, pictures=False)


def test_ensemble_command_joins_runs_that_evaluate_opens(tmp_path):
    """Members from --init-seed share data and split and differ in weights; the joined
    folder opens as a run, and its evaluation scores the members' predictions."""
    a, b = _tiny(tmp_path / "a", 1), _tiny(tmp_path / "b", 2)
    ra, rb = load_run(a), load_run(b)
    assert ra.split == rb.split
    pa, pb = ra.model.state_dict(), rb.model.state_dict()
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)
    res = CliRunner().invoke(cli, ["ensemble", str(a), str(b), "--out", str(tmp_path / "ens")])
    assert res.exit_code == 0, res.output
    assert "ensemble of 2 (unet, unet)" in res.output
    ens = load_run(tmp_path / "ens")
    assert ens.model.name == "ensemble" and ens.split == ra.split
    image = torch.rand(3, C, H, H)
    with torch.no_grad():
        s = ens.model.sample(image, 2)
        torch.testing.assert_close(s[0], ra.model.sample(image, 1)[0])
        torch.testing.assert_close(s[1], rb.model.sample(image, 1)[0])
    report = evaluate_run(tmp_path / "ens", num_samples=8, device="cpu", collapse_samples=0)
    assert report["model"] == "ensemble" and report["num_samples"] == 2 and "nll" in report
    tta = evaluate_run(a, num_samples=8, device="cpu", collapse_samples=0, tta=True)
    assert tta["model"] == "unet+tta" and tta["num_samples"] == 4 and tta["tta"] is True
    res = CliRunner().invoke(cli, ["sample", str(tmp_path / "ens"), "--split", "test", "--num-images", "1",
                                   "--num-samples", "4", "--tta", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "s").glob("*_sample_*.png"))) == 8  # 4 flips x 2 members, each member under each flip
    nll_b = evaluate_run(b, num_samples=1, device="cpu", collapse_samples=0)["nll"]
    # the mixture's NLL, -log (p_a + p_b) / 2 per image, is below the members' mean NLL (Jensen)
    assert report["nll"] < (tta["nll"] + nll_b) / 2


# ------------------------------------------------------------------------------------- phiseg


def _kl_diag_gauss(mu_q, sigma_q, mu_p, sigma_p):
    """The reference's KL_two_gauss_with_diag_cov, per image (summed over all positions)."""
    t = (sigma_q**2 + (mu_p - mu_q) ** 2) / sigma_p**2 + torch.log(sigma_p**2) - torch.log(sigma_q**2) - 1
    return 0.5 * t.flatten(1).sum(1)


@pytest.mark.parametrize(("level_loss_weight", "exponential", "beta", "recon_scale"),
                         [(1.0, True, 1.0, 1.0), (0.5, False, 0.3, 2.0), (0.0, True, 1.0, 1.0)])
def test_phiseg_loss_is_the_references_multi_level_loss(level_loss_weight, exponential, beta, recon_scale):
    """loss = recon_scale * [NLL(y | s_1+...+s_L) + w * sum_{l>=2} NLL(y | s_l+...+s_L)]
    + beta * sum_l 4^(l-1) KL_l, computed by hand from the networks (the reference's
    residual_multinoulli_loss and hierarchical KL with exponential_weighting), equals
    SiteELBO's and Pyro's TraceMeanField_ELBO's loss; SiteELBO's terms are unscaled."""
    from pyro.infer import TraceMeanField_ELBO

    model = _perturbed("phiseg", level_loss_weight=level_loss_weight, exponential_weighting=exponential)
    image, mask = _batch()
    assert model.latent_sites == ("z_3", "z_2", "z_1")
    kw = {"beta": beta, "recon_scale": recon_scale}
    pyro.set_rng_seed(5)
    loss, terms = SiteELBO().differentiable_loss_and_terms(model.model, model.guide, image, mask, **kw)
    pyro.set_rng_seed(5)
    pyro_loss = TraceMeanField_ELBO().differentiable_loss(model.model, model.guide, image, mask, **kw)

    # by hand, with the same posterior draws: the guide draws z_3, z_2, z_1 in that order
    pyro.set_rng_seed(5)
    with torch.no_grad():
        q, p, zs = {}, {}, {}

        def draw(name, loc, scale):
            q[name] = (loc, scale)
            zs[name] = loc + scale * torch.randn_like(loc)
            return zs[name]

        def given(name, loc, scale):
            p[name] = (loc, scale)
            return zs[name]

        model.posterior_net.walk(model.posterior_net.encode(torch.cat([image, mask - 0.5], 1)), draw)
        model.prior_net.walk(model.prior_net.encode(image), given)
        s = model.likelihood_net([zs["z_1"], zs["z_2"], zs["z_3"]], (H, H))  # finest first, (B, 1, H, W)
        assert [t.shape for t in s] == [(B, 1, H, H)] * 3
        # each level's map is constant on blocks of 2^(l-1) pixels (nearest upsampling of H / 2^(l-1))
        assert torch.equal(s[2], s[2][..., ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2))

        def nll(logits):
            return F.binary_cross_entropy_with_logits(logits, mask, reduction="none").flatten(1).sum(1)

        nll_1, nll_2, nll_3 = nll(s[0] + s[1] + s[2]), nll(s[1] + s[2]), nll(s[2])
        kl = {n: _kl_diag_gauss(*q[n], *p[n]) for n in ("z_1", "z_2", "z_3")}
        weight = {"z_1": 1.0, "z_2": 4.0, "z_3": 16.0} if exponential else {"z_1": 1.0, "z_2": 1.0, "z_3": 1.0}
        expected = recon_scale * (nll_1 + level_loss_weight * (nll_2 + nll_3)).sum() + beta * sum(
            weight[n] * kl[n].sum() for n in kl)

    assert float(expected) > 1.0
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(pyro_loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(terms["recon"], nll_1, rtol=1e-5, atol=1e-4)  # the full-resolution "mask" site
    if level_loss_weight > 0:
        torch.testing.assert_close(terms["recon_mask_2"], nll_2, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(terms["recon_mask_3"], nll_3, rtol=1e-5, atol=1e-4)
    else:
        assert "recon_mask_2" not in terms
    for n in kl:  # unweighted
        torch.testing.assert_close(terms[f"kl_{n}"], kl[n], rtol=1e-4, atol=1e-4)
        assert float(kl[n].min()) > 0


def test_phiseg_samples_come_from_the_prior_and_encode_once():
    """``sample`` runs the prior encoder once for all samples, and its mean over many
    samples differs from a single one (the latents matter)."""
    model = _perturbed("phiseg").eval()
    image = torch.rand(1, C, H, H)
    calls = []  # the batch size each encoder block sees
    for block in model.prior_net.encoder:
        block.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        s = model.sample(image, 6)
    assert s.shape == (6, 1, 1, H, H)
    assert calls == [1] * len(model.prior_net.encoder)  # each encoder block once, on the one image
    assert float((s - s[:1]).abs().max()) > 1e-3


def test_phiseg_levels_scale_with_the_image_and_are_checked():
    m64 = build_model("phiseg", image_size=64)
    assert (m64.resolution_levels, m64.latent_levels) == (6, 4)
    m128 = build_model("phiseg", image_size=128)  # the reference's 7 resolution and 5 latent levels
    assert (m128.resolution_levels, m128.latent_levels) == (7, 5)
    assert m128.latent_sites == ("z_5", "z_4", "z_3", "z_2", "z_1")
    assert [m128.kl_weight(n) for n in m128.latent_sites] == [256.0, 64.0, 16.0, 4.0, 1.0]
    m = build_model("phiseg", image_size=64, latent_levels=5)
    assert m.resolution_levels == 6 and m.latent_sites[0] == "z_5"
    rebuilt = build_model("phiseg", **m.hparams())
    assert rebuilt.num_params == m.num_params and rebuilt.latent_levels == 5


# ------------------------------------------------------------------------- hyper-parameter checks


@pytest.mark.parametrize(("name", "kw", "words"), [
    ("prob_unet", {"latent_dim": -3}, "--model-arg latent_dim=-3: expected a positive integer"),
    ("prob_unet", {"comb_hidden": 0}, "--model-arg comb_hidden=0: expected a positive integer"),
    ("prob_unet", {"dropout": -0.1}, "--model-arg dropout=-0.1: expected a rate in [0, 1)"),
    ("prob_unet", {"dropout": 0.5, "test_dropout": "yes"}, "--model-arg test_dropout='yes': expected true or false"),
    ("vae", {"latent_dim": 2.5}, "--model-arg latent_dim=2.5: expected a positive integer"),
    ("skip_vae", {"hidden": "many"}, "--model-arg hidden='many': expected a positive integer"),
    ("hvae", {"latent_dims": [4, 4]}, "--model-arg latent_dims=[4, 4]: expected a list of 3 positive integers"),
    ("hvae", {"latent_dims": 7}, "--model-arg latent_dims=7: expected a list of 3 positive integers"),
    ("ssn", {"rank": 0}, "--model-arg rank=0: expected a positive integer"),
    ("ssn", {"num_mc_samples": True}, "--model-arg num_mc_samples=True: expected a positive integer"),
    ("ssn", {"epsilon": -1e-5}, "--model-arg epsilon=-1e-05: expected a number > 0"),
    ("mc_dropout", {"dropout": 1.0}, "--model-arg dropout=1.0: expected a rate in [0, 1)"),
    ("mc_dropout", {"dropout": "x"}, "--model-arg dropout='x': expected a rate in [0, 1)"),
    ("unet", {"widths": (8, 0, 32, 64)}, "--widths [8, 0, 32, 64]: expected a list of positive integers"),
    ("phiseg", {"latent_levels": 0}, "--model-arg latent_levels=0: expected a positive integer"),
    ("phiseg", {"latent_levels": 6}, "--model-arg latent_levels=6: expected at most resolution_levels (5)"),
    ("phiseg", {"resolution_levels": 6},
     "--model-arg resolution_levels=6: expected at most 5 at --image-size 32 (the coarsest level 2x2)"),
    ("phiseg", {"zdim": -2}, "--model-arg zdim=-2: expected a positive integer"),
    ("phiseg", {"n0": "wide"}, "--model-arg n0='wide': expected a positive integer"),
    ("phiseg", {"level_loss_weight": -1}, "--model-arg level_loss_weight=-1: expected a number >= 0"),
    ("phiseg", {"exponential_weighting": "yes"}, "--model-arg exponential_weighting='yes': expected true or false"),
])  # fmt: skip
def test_bad_hyper_parameters_are_one_line(name, kw, words):
    with pytest.raises(UsageError) as e:
        build_model(name, image_size=H, **kw)
    assert str(e.value) == words


def test_good_hyper_parameters_pass_converted():
    assert positive_int("k", "16") == 16 and positive_int("k", 4.0) == 4
    assert positive_ints("k", [1, "2", 3.0], length=3) == (1, 2, 3)
    assert rate("p", "0.25") == 0.25 and rate("p", 0) == 0.0
    m = build_model("prob_unet", image_size=H, latent_dim="3")
    assert m.latent_dim == 3 and m.hparams()["latent_dim"] == 3


def test_ssn_predict_is_the_mean_of_many_draws():
    """``predict``'s probit approximation of ``E[sigmoid(eta)]`` is the mean of many draws."""
    model = _perturbed("ssn").eval()
    image = torch.rand(1, C, H, H)
    with torch.no_grad():
        pyro.set_rng_seed(0)
        many = model.sample(image, 4000).mean(0)
        approx = model.predict(image)
    assert approx.shape == (1, 1, H, H)
    torch.testing.assert_close(approx, many, atol=0.03, rtol=0)
