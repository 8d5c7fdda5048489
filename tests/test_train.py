"""The SVI loop: equal to Pyro's own SVI step, guarded against non-finite steps,
sharded and resumable shuffling, and a fit that learns."""

from __future__ import annotations

import copy
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO

from pyroseg.config import FitConfig
from pyroseg.errors import TrainingError, UsageError
from pyroseg.models import MODELS, build_model
from pyroseg.train import EpochSampler, Trainer, fit, resolve_device

H = 32


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, H, H, generator=g)
    mask = (torch.rand(b, 1, H, H, generator=g) > 0.85).float()
    return image, mask


@pytest.mark.parametrize("name", ["unet", "prob_unet", "hvae"])
def test_trainer_step_equals_pyro_svi_step(name):
    """Our step (differentiable_loss + torch Adam) is Pyro's SVI step with
    pyro.optim.Adam: after two steps from the same weights and noise, the
    weights agree. Our loss is per image, so SVI gets the same 1/B scale."""
    image, mask = _batch()
    pyro.set_rng_seed(0)
    ours = build_model(name, image_size=H)
    theirs = copy.deepcopy(ours)
    trainer = Trainer(ours, lr=1e-3, elbo="meanfield")
    pyro.clear_param_store()
    scale = 1.0 / image.shape[0]
    svi = SVI(
        poutine.scale(theirs.model, scale=scale),
        poutine.scale(theirs.guide, scale=scale),
        pyro.optim.Adam({"lr": 1e-3}),
        TraceMeanField_ELBO(),
    )
    ours_losses, svi_losses = [], []
    for step in range(2):
        pyro.set_rng_seed(100 + step)
        out = trainer.step(image, mask, beta=0.5)
        assert out.applied
        ours_losses.append(out.loss)
    # Both register their networks under the same names: clear the store so that
    # SVI finds its own tensors, not ours (the stale-param-store pitfall).
    pyro.clear_param_store()
    for step in range(2):
        pyro.set_rng_seed(100 + step)
        svi_losses.append(svi.step(image, mask, beta=0.5))
    assert ours_losses == pytest.approx(svi_losses, rel=1e-5)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n1)
    moved = sum(float((p1 - p0).detach().abs().sum()) for p1, p0 in zip(ours.parameters(), build_model(name, image_size=H).parameters()))
    assert moved > 0


@pytest.mark.parametrize("validate", [False, True])
def test_nonfinite_step_is_skipped_counted_and_stops_training(validate):
    model = build_model("unet", image_size=H)
    trainer = Trainer(model, lr=1e-3, max_nonfinite=3, validate=validate)
    image, mask = _batch()
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(trainer.optimizer.state_dict())
    bad = image.clone()
    bad[0, 0, 0, 0] = float("nan")  # an injected NaN
    for i in range(2):
        out = trainer.step(bad, mask)
        assert not out.applied and math.isnan(out.loss)
        assert trainer.nonfinite_streak == i + 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    assert trainer.optimizer.state_dict()["state"] == opt_before["state"]
    assert trainer.step(image, mask).applied  # a good step resets the streak
    assert trainer.nonfinite_streak == 0 and trainer.nonfinite_total == 2
    for _ in range(2):
        trainer.step(bad, mask)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        trainer.step(bad, mask)


def test_clip_norm_bounds_the_update():
    image, mask = _batch()
    pyro.set_rng_seed(0)
    model = build_model("unet", image_size=H)
    trainer = Trainer(model, lr=1e-3, clip_norm=1e-3)
    out = trainer.step(image, mask)
    assert out.grad_norm > 1e-3  # the reported norm is the one before clipping
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert total == pytest.approx(1e-3, rel=1e-3)


def test_epoch_sampler_shards_cover_the_single_process_batches_and_resume():
    ds = list(range(40))
    single = EpochSampler(ds, seed=3)
    single.set_position(2)
    order = list(single)
    assert sorted(order) == ds
    ranks = [EpochSampler(ds, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_position(2)
    shards = [list(s) for s in ranks]
    b = 4  # per-rank batch; the global batch is 8
    for i in range(len(shards[0]) // b):
        union = set(shards[0][i * b : (i + 1) * b]) | set(shards[1][i * b : (i + 1) * b])
        assert union == set(order[i * 2 * b : (i + 1) * 2 * b])
    single.set_position(2, skip=12)
    assert list(single) == order[12:] and len(single) == 28
    other = EpochSampler(ds, seed=3)
    other.set_position(3)
    assert list(other) != order  # reshuffled every epoch


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda")


def _tiny_config(tmp_path, model="unet", **kw):
    base = dict(model=model, data="synthetic", out=str(tmp_path / model), image_size=32, epochs=2, batch_size=16,
                synthetic_patients=6, synthetic_slices=8, val_samples=2, seed=0)
    base.update(kw)
    return FitConfig(**base)


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_one_epoch_writes_the_run(tmp_path, name):
    out = fit(_tiny_config(tmp_path, name, epochs=1), pictures=name in ("unet", "hprob_unet"))
    for f in ("config.json", "split.json", "metrics.csv", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert (out / "curves.png").is_file() == (out / "val_samples.png").is_file() == (name in ("unet", "hprob_unet"))
    import csv
    import json

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1
    for site in MODELS[name].latent_sites:
        assert f"val_kl_{site}" in rows[0]
    doc = json.loads((out / "config.json").read_text())
    assert doc["model"]["name"] == name and doc["versions"]["torch"] == torch.__version__
    split = json.loads((out / "split.json").read_text())
    assert not (set(split["train"]) & set(split["val"])) and not (set(split["train"]) & set(split["test"]))


def test_fit_is_reproducible_from_the_seed(tmp_path):
    a = fit(_tiny_config(tmp_path, out=str(tmp_path / "a")), pictures=False)
    b = fit(_tiny_config(tmp_path, out=str(tmp_path / "b")), pictures=False)
    sa = torch.load(a / "checkpoint.pt", weights_only=True)["model_state"]
    sb = torch.load(b / "checkpoint.pt", weights_only=True)["model_state"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = fit(_tiny_config(tmp_path, out=str(tmp_path / "c"), seed=1), pictures=False)
    sc = torch.load(c / "checkpoint.pt", weights_only=True)["model_state"]
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_fit_refuses_an_existing_run_unless_told(tmp_path):
    cfg = _tiny_config(tmp_path, epochs=1)
    out = fit(cfg, pictures=False)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        fit(cfg, pictures=False)
    assert (out / "checkpoint.pt").read_bytes() == before
    fit(cfg, overwrite=True, pictures=False)


def test_resume_continues_to_the_same_weights(tmp_path):
    """2 epochs, then resume to 3, equals 3 epochs straight (CPU, fixed seed)."""
    straight = fit(_tiny_config(tmp_path, model="prob_unet", epochs=3, beta_warmup=1.0, out=str(tmp_path / "straight")), pictures=False)
    part = fit(_tiny_config(tmp_path, model="prob_unet", epochs=2, beta_warmup=1.0, out=str(tmp_path / "part")), pictures=False)
    fit(FitConfig(out=str(part), epochs=3), resume=True, pictures=False)
    s1 = torch.load(straight / "checkpoint.pt", weights_only=True)
    s2 = torch.load(part / "checkpoint.pt", weights_only=True)
    for k in s1["model_state"]:
        torch.testing.assert_close(s1["model_state"][k], s2["model_state"][k], rtol=0, atol=0, msg=k)
    assert [r["epoch"] for r in s2["history"]] == [1, 2, 3]


def test_fused_adam_option_takes_adams_step():
    """Opt-in fused Adam: the same update as the default loop, to the rounding that
    matters where gradients are near Adam's eps."""
    image, mask = _batch()
    pyro.set_rng_seed(0)
    a = build_model("prob_unet", image_size=H)
    b = copy.deepcopy(a)
    fused, loop = Trainer(a, fused_adam=True), Trainer(b)
    assert fused.optimizer.param_groups[0]["fused"] and not loop.optimizer.param_groups[0]["fused"]
    for step in range(2):
        pyro.set_rng_seed(100 + step)
        fused.step(image, mask, beta=0.5)
        pyro.set_rng_seed(100 + step)
        loop.step(image, mask, beta=0.5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=n)


@pytest.mark.parametrize("name, expected, args", [("unet", 2, {}), ("prob_unet", 4, {}), ("hprob_unet", 8, {"layout": "v1"})])
def test_compile_networks_marks_the_conv_networks_and_keeps_the_state_dict(name, expected, args):
    """``--compile`` compiles Encoders, Decoders and stray ConvBlocks in place (lazily:
    nothing is compiled before the first call); parameter names do not change.
    (hprob_unet's default residual blocks are none of these: not compiled.)"""
    from pyroseg.nets import compile_networks

    model = build_model(name, image_size=H, **args)
    keys = list(model.state_dict())
    assert compile_networks(model) == expected
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_compiled_trainer_step_matches_eager():
    image, mask = _batch()
    pyro.set_rng_seed(0)
    eager_model = build_model("unet", image_size=H)
    compiled = Trainer(copy.deepcopy(eager_model), compile=True)
    eager = Trainer(eager_model)
    out_c = compiled.step(image, mask)
    out_e = eager.step(image, mask)
    assert out_c.loss == pytest.approx(out_e.loss, rel=1e-4)
    # The gradients are what compiling can change: they agree to float rounding (measured 6e-6
    # of each tensor's largest entry). The weights after Adam's first step agree less tightly:
    # that step is about lr * g / (|g| + eps), which amplifies rounding where |g| is near eps
    # (measured 5e-5 on one weight, against lr = 1e-3), as in the fused-Adam note.
    for (n, p), (_, q) in zip(compiled.model.named_parameters(), eager.model.named_parameters()):
        scale = float(q.grad.abs().max())
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-4 * scale + 1e-12, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(p, q, rtol=0, atol=2e-4, msg=lambda m, n=n: f"{n}: {m}")
