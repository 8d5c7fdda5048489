"""The SVI loop: equal to Pyro's own SVI step, guarded against non-finite steps,
sharded and resumable shuffling, and a fit that learns."""

from __future__ import annotations

import copy
import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO

from pyroseg.config import FitConfig
from pyroseg.errors import TrainingError, UsageError
from pyroseg.models import MODELS, build_model
from pyroseg.schedules import lr_at
from pyroseg.train import EpochSampler, FitCallbacks, Trainer, fit, resolve_device, select_metric

H = 32


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, H, H, generator=g)
    mask = (torch.rand(b, 1, H, H, generator=g) > 0.85).float()
    return image, mask


@pytest.mark.parametrize("name", ["unet", "prob_unet", "hvae", "mc_dropout"])
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
    for site in build_model(name, image_size=_tiny_config(tmp_path, name).image_size).latent_sites:
        assert f"val_kl_{site}" in rows[0]  # an instance's sites (phiseg's depend on the image size)
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


@pytest.mark.parametrize("name", ["prob_unet", "ssn", "mc_dropout", "phiseg"])
def test_resume_continues_to_the_same_weights(tmp_path, name):
    """2 epochs, then resume to 3, equals 3 epochs straight (CPU, fixed seed): the
    noise (z, eta, dropout masks) is restored with the weights."""
    straight = fit(_tiny_config(tmp_path, model=name, epochs=3, beta_warmup=1.0, out=str(tmp_path / "straight")), pictures=False)
    part = fit(_tiny_config(tmp_path, model=name, epochs=2, beta_warmup=1.0, out=str(tmp_path / "part")), pictures=False)
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


# --------------------------------------------------------------------------- the training recipe


class _KillAt(FitCallbacks):
    """Raises at the given step, as a kill would stop the process there (after the
    step, before any checkpoint due at it)."""

    def __init__(self, step: int):
        self.step, self.n = step, 0

    def on_step(self, loss):
        self.n += 1
        if self.n == self.step:
            raise KeyboardInterrupt


RECIPE = dict(model="prob_unet", epochs=3, batch_size=8, augment="standard", lr_schedule="cosine", lr_warmup=1.0,
              select_by="val_loss", beta_warmup=1.0)


def test_recipe_state_survives_a_kill_and_resume_bit_for_bit(tmp_path):
    """Augmentation, the cosine schedule with warm-up and best.pt: killed mid-epoch 2
    (last checkpoint one step earlier), resumed, equal to the unbroken run in
    weights, Adam state, learning rate, history and best.pt, bit for bit."""
    straight = fit(_tiny_config(tmp_path, out=str(tmp_path / "straight"), **RECIPE), pictures=False)
    cfg = _tiny_config(tmp_path, out=str(tmp_path / "killed"), **RECIPE)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, callbacks=_KillAt(7), checkpoint_every=3, pictures=False)  # 4 steps per epoch; last checkpoint: step 6
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best"]["epoch"]) == (1, 2, 1)
    fit(FitConfig(out=str(tmp_path / "killed"), epochs=0), resume=True, checkpoint_every=3, pictures=False)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    for k, v in a["trainer"]["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["trainer"]["optimizer"]["state"][k]["exp_avg_sq"]), k
    assert a["trainer"]["optimizer"]["param_groups"][0]["lr"] == b["trainer"]["optimizer"]["param_groups"][0]["lr"]
    assert a["best"] == b["best"] and a["best"]["metric"] == "val_loss"
    assert len(a["history"]) == len(b["history"]) == 3
    for ra, rb in zip(a["history"], b["history"]):
        assert {k: v for k, v in ra.items() if not k.endswith("_time_s")} == {k: v for k, v in rb.items() if not k.endswith("_time_s")}
    # the learning rate of each epoch's last step follows the schedule (4 steps per epoch)
    assert [r["lr"] for r in a["history"]] == [lr_at(e + 3 / 4, lr=1e-3, schedule="cosine", warmup=1.0, epochs=3) for e in range(3)]
    ba = torch.load(straight / "best.pt", weights_only=True)
    bb = torch.load(tmp_path / "killed" / "best.pt", weights_only=True)
    assert ba["best"] == bb["best"] == a["best"] and ba["epoch"] == a["best"]["epoch"]
    for k in ba["model_state"]:
        assert torch.equal(ba["model_state"][k], bb["model_state"][k]), k


def test_best_checkpoint_is_the_best_validation_epoch(tmp_path):
    out = fit(_tiny_config(tmp_path, epochs=3, select_by="val_loss"), pictures=False)
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    best = torch.load(out / "best.pt", weights_only=True)
    losses = [r["val_loss"] for r in history]
    assert best["best"] == {"metric": "val_loss", "value": min(losses), "epoch": 1 + losses.index(min(losses)),
                            "val_loss": min(losses)}
    assert best["epoch"] == best["best"]["epoch"] and "trainer" not in best  # weights only, no optimizer


def test_select_by_auto_is_dice_on_one_annotator_and_ged_on_several():
    assert select_metric("auto", 1) == ("val_dice_tumour", "max")
    assert select_metric("auto", 4) == ("val_ged", "min")
    assert select_metric("val_loss", 1) == ("val_loss", "min")
    with pytest.raises(UsageError, match="--select-by val_ged"):
        select_metric("val_ged", 1)


def test_patience_stops_when_the_score_stops_improving(tmp_path):
    """With patience 1 the run ends one epoch after its best epoch, or at --epochs."""
    out = fit(_tiny_config(tmp_path, epochs=5, select_by="val_dice_all", patience=1), pictures=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == len(ckpt["history"]) == min(5, ckpt["best"]["epoch"] + 1)
    # resumed with more epochs, a stopped run stays stopped (the stop is a function of the saved state)
    if ckpt["epoch"] < 5:
        fit(FitConfig(out=str(out), epochs=8), resume=True, pictures=False)
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == ckpt["epoch"]


def test_old_configs_read_without_the_recipe_mean_no_augmentation():
    cfg = FitConfig.from_dict({"model": "unet"})
    assert (cfg.augment, cfg.lr_schedule, cfg.patience) == ("none", "constant", None)
    for bad, match in [(dict(augment="elastic"), "--augment"), (dict(lr_schedule="linear"), "--lr-schedule"),
                       (dict(patience=0), "--patience"), (dict(lr_warmup=-1), "--lr-warmup"), (dict(select_by="x"), "--select-by")]:
        with pytest.raises(UsageError, match=match):
            FitConfig(**bad).validate()


def test_fit_run_state_is_set_in_its_constructor_and_handlers_see_every_hook(tmp_path, monkeypatch):
    """FitRun.__init__ sets every attribute (the phases fill them in, none invents
    one), the model is built for real once (the meta-device check draws no
    weights), and a handler appended in build_handlers sees every hook in order."""
    import pyroseg.train as train_mod

    real = []
    build = train_mod.build_model

    def counting(*a, **kw):
        model = build(*a, **kw)
        if next(model.parameters()).device.type != "meta":
            real.append(model)
        return model

    monkeypatch.setattr(train_mod, "build_model", counting)
    calls = []

    class Recorder(train_mod.Handler):
        def on_epoch_start(self, run):
            calls.append(("start", run.progress.epoch))

        def on_step_end(self, run, outcome):
            calls.append(("step", run.progress.global_step))

        def on_epoch_end(self, run, row):
            calls.append(("end", row["epoch"], run.progress.history[-1] is row))

        def on_finish(self, run):
            calls.append(("finish", run.progress.epoch))

    class Run(train_mod.FitRun):
        def build_handlers(self):
            return [*super().build_handlers(), Recorder()]

    run = Run(_tiny_config(tmp_path, epochs=2), pictures=False)
    before = set(vars(run))
    assert run.run() == run.out
    assert set(vars(run)) == before
    assert len(real) == 1 and run.model is real[0]
    steps = run.steps_per_epoch
    assert calls == [("start", 0), *[("step", i) for i in range(1, steps + 1)], ("end", 1, True),
                     ("start", 1), *[("step", i) for i in range(steps + 1, 2 * steps + 1)], ("end", 2, True), ("finish", 2)]
    assert [type(h).__name__ for h in run.handlers] == ["Budget", "BestCheckpoint", "PeriodicCheckpoint", "MetricsCSV",
                                                       "TrainingRecord", "CallbackHandler", "Recorder"]


# --------------------------------------------------------------------------- budgets in steps, stopping on a plateau


def _record(out):
    import json

    return json.loads((out / "training.json").read_text())


def test_max_steps_stops_mid_epoch_and_records_why(tmp_path):
    """--max-steps 6 at 4 steps per epoch: 6 steps (--epochs 1 is no stop), the last
    checkpoint at step 6 mid-epoch, one validation (the first epoch's end)."""
    out = fit(_tiny_config(tmp_path, epochs=1, batch_size=8, max_steps=6), pictures=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (6, 1, 2)
    rec = _record(out)
    assert (rec["steps"], rec["epochs"], rec["stop_reason"], rec["val_every"]) == (6, 1.5, "budget", None)
    assert (rec["select_by"], rec["mode"]) == ("val_dice_tumour", "max")
    assert [s for s, _ in rec["curve"]] == [4] and rec["best"]["step"] == 4
    default = _record(fit(_tiny_config(tmp_path, epochs=2, out=str(tmp_path / "epochs")), pictures=False))
    assert (default["stop_reason"], default["epochs"], len(default["curve"])) == ("budget", 2.0, 2)


def test_default_kl_warm_up_is_a_quarter_of_the_step_budget(tmp_path):
    """With --max-steps the default warm-up is a quarter of the steps (not of --epochs, which no
    longer stops training): 16 steps at 4 per epoch -> 1 epoch; beta reaches 1 at step 4."""
    import csv

    cfg = _tiny_config(tmp_path, model="prob_unet", epochs=50, batch_size=8, max_steps=16, val_every=2)
    assert cfg.validate().beta_warmup is None  # resolved by the run, which knows the steps per epoch
    out = fit(cfg, pictures=False)
    betas = {int(r["step"]): float(r["beta"]) for r in csv.DictReader(open(out / "metrics.csv"))}
    assert betas[2] == pytest.approx(0.5) and betas[4] == betas[16] == 1.0
    assert _record(out)["beta_warmup_epochs"] == 1.0
    assert _tiny_config(tmp_path, epochs=8).validate().beta_warmup == 2.0  # epoch budgets: resolved at once


def test_raters_all_trains_on_every_rater_of_each_image(tmp_path, monkeypatch):
    """--raters all: each step's loss is over every (image, rater) pair (4 raters: 4x the images);
    --raters one: one mask per image. Seen from the loss the trainer is given."""
    from pyroseg.training.step import Trainer

    seen = {}
    step = Trainer.step

    def spy(self, image, mask, **kw):
        seen.setdefault(kw.get("beta"), []).append((image.shape[0], mask.shape[1]))
        return step(self, image, mask, **kw)

    monkeypatch.setattr(Trainer, "step", spy)
    kw = dict(model="prob_unet", data="synthetic-ambiguous", batch_size=8, max_steps=2, beta_warmup=0.0)
    fit(_tiny_config(tmp_path, out=str(tmp_path / "one"), **kw), pictures=False)
    one = seen.pop(1.0)
    fit(_tiny_config(tmp_path, out=str(tmp_path / "all"), raters="all", **kw), pictures=False)
    assert one == [(8, 1), (8, 1)] and seen[1.0] == [(32, 1), (32, 1)]
    assert json.loads((tmp_path / "all" / "config.json").read_text())["fit"]["raters"] == "all"


def test_val_every_validates_every_n_steps(tmp_path):
    import csv

    out = fit(_tiny_config(tmp_path, batch_size=8, max_steps=7, val_every=2), pictures=False)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [float(r["epoch"]) for r in rows] == [0.5, 1.0, 1.5]  # epochs trained: fractional mid-epoch
    rec = _record(out)
    assert [s for s, _ in rec["curve"]] == [2, 4, 6] and rec["val_every"] == 2 and rec["steps"] == 7
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 7  # saved at the stop


def test_patience_counts_validations_and_stops_on_a_plateau(tmp_path, monkeypatch):
    import pyroseg.train as train_mod

    monkeypatch.setattr(train_mod, "_validate", lambda *a, **kw: {"val_loss": 1.0})  # never improves after the first
    out = fit(_tiny_config(tmp_path, batch_size=8, max_steps=20, val_every=1, patience=2, select_by="val_loss"),
              pictures=False)
    rec = _record(out)
    assert (rec["stop_reason"], rec["steps"], rec["curve"]) == ("plateau", 3, [[1, 1.0], [2, 1.0], [3, 1.0]])
    assert rec["best"] == {"step": 1, "score": 1.0}


def test_a_tied_score_with_a_falling_validation_loss_is_not_a_plateau(tmp_path, monkeypatch):
    """Masks still all empty score the same Dice at every validation while the loss falls:
    patience 2 counts from the last fall (step 4), so the run stops at step 6, not at step 3."""
    import pyroseg.train as train_mod

    losses = iter([5.0, 4.0, 3.0, 2.0, 2.0, 2.5] + [9.0] * 20)
    monkeypatch.setattr(train_mod, "_validate", lambda *a, **kw: {"val_dice_all": 0.0, "val_loss": next(losses)})
    out = fit(_tiny_config(tmp_path, batch_size=8, max_steps=20, val_every=1, patience=2, select_by="val_dice_all"),
              pictures=False)
    rec = _record(out)
    assert (rec["stop_reason"], rec["steps"], rec["best"]) == ("plateau", 6, {"step": 4, "score": 0.0})


def test_patience_waits_for_the_end_of_the_kl_warm_up(tmp_path, monkeypatch):
    """A latent model whose score never improves still trains through its KL warm-up (12 steps:
    a quarter of 48, 3 epochs of 4 steps), then stops after --patience 2 validations at the full
    KL weight (steps 12 and 14); without the warm-up rule it would stop at step 6."""
    import pyroseg.train as train_mod

    monkeypatch.setattr(train_mod, "_validate", lambda *a, **kw: {"val_loss": 1.0})
    out = fit(_tiny_config(tmp_path, model="prob_unet", batch_size=8, max_steps=48, val_every=2, patience=2,
                           select_by="val_loss"), pictures=False)
    rec = _record(out)
    assert (rec["stop_reason"], rec["steps"], rec["beta_warmup_epochs"]) == ("plateau", 14, 3.0)


def test_max_minutes_stops_after_the_step_that_spends_them(tmp_path):
    rec = _record(fit(_tiny_config(tmp_path, epochs=3, batch_size=8, max_minutes=1e-4), pictures=False))
    assert (rec["stop_reason"], rec["steps"], rec["curve"]) == ("time", 1, [])


@pytest.mark.parametrize("how", ["budget", "kill"])
def test_val_every_resume_equals_an_unbroken_run(tmp_path, how):
    """prob_unet (validation draws samples) with a validation every 3 steps, mid-epoch: stopped
    at step 5 by --max-steps then resumed to 10, or killed after step 8 (last checkpoint: the
    validation at step 6) and resumed, equals 10 steps straight: weights, rows, training.json."""
    kw = dict(model="prob_unet", batch_size=8, val_every=3, beta_warmup=1.0, select_by="val_loss")
    straight = fit(_tiny_config(tmp_path, out=str(tmp_path / "straight"), max_steps=10, **kw), pictures=False)
    out = tmp_path / "broken"
    if how == "budget":
        fit(_tiny_config(tmp_path, out=str(out), max_steps=5, **kw), pictures=False)
        assert _record(out)["steps"] == 5
    else:
        with pytest.raises(KeyboardInterrupt):
            fit(_tiny_config(tmp_path, out=str(out), max_steps=10, **kw), callbacks=_KillAt(8), pictures=False)
        assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 6
    fit(FitConfig(out=str(out), epochs=0, max_steps=10 if how == "budget" else None), resume=True, pictures=False)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    assert [r["step"] for r in a["history"]] == [3, 6, 9]

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in rows]

    assert untimed(a["history"]) == untimed(b["history"]) and a["best"] == b["best"]
    ra, rb = _record(straight), _record(out)
    assert ra == rb and ra["steps"] == 10 and ra["stop_reason"] == "budget"
