"""The non-finite guard without host reads: fused Adam's ``found_inf``
masks the update on the device, the counters live on the device and are read back
every ``check_every`` steps. Run on CPU: the same code path a GPU takes."""

import copy
import logging
import math
import traceback

import pyro
import pytest
import torch

from pyroseg.errors import TrainingError
from pyroseg.models import build_model
from pyroseg.train import Trainer

H = 32
W = (8, 16, 32, 64)  # small networks: the guard does not depend on their size
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


def _batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, H, H, generator=g)
    mask = (torch.rand(b, 1, H, H, generator=g) > 0.85).float()
    return image, mask


class _HostReads:
    """Record every Python-level read of a tensor's value (what waits for a GPU)."""

    def __enter__(self):
        self.calls = []
        self.orig = {n: getattr(torch.Tensor, n) for n in HOST_READS}

        def wrap(n):
            def f(t, *a, **k):
                self.calls.append((n, "".join(traceback.format_stack(limit=5)[:-1])))
                return self.orig[n](t, *a, **k)
            return f

        for n in HOST_READS:
            setattr(torch.Tensor, n, wrap(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.orig.items():
            setattr(torch.Tensor, n, f)


def _adam_state(trainer):
    return {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state_dict()["state"].items()}


@pytest.mark.parametrize("name", ["unet", "prob_unet", "hprob_unet"])
def test_fused_step_reads_nothing_back_from_the_device(name):
    """With fused Adam and checks every 10 steps, a step (Pyro's trace, the loss,
    backward, the norm, the guard, Adam) reads no tensor's value on the host, so on
    a GPU it never waits for the device; the loop Adam does (its decision)."""
    pyro.set_rng_seed(0)
    image, mask = _batch()
    trainer = Trainer(build_model(name, image_size=H, widths=W), fused_adam=True, check_every=10)
    trainer.step(image, mask)
    with _HostReads() as reads:
        out = trainer.step(image, mask, beta=0.5)
    assert reads.calls == [], reads.calls[0][1]
    assert out.applied and math.isfinite(out.loss)  # read lazily, after the step
    loop = Trainer(build_model(name, image_size=H, widths=W), check_every=10)
    with _HostReads() as reads:
        loop.step(image, mask)
    assert any(n == "__bool__" for n, _ in reads.calls)


def test_fused_guard_leaves_weights_and_adam_untouched_and_stops_at_the_check(caplog):
    """Non-finite steps under the device-side guard: no weight, moment or step
    count moves; the good steps between them are taken as usual; the counters are
    right when read; --max-nonfinite in a row raises at the next check."""
    pyro.set_rng_seed(0)
    image, mask = _batch()
    bad = image.clone()
    bad[0, 0, 0, 0] = float("nan")
    trainer = Trainer(build_model("unet", image_size=H, widths=W), fused_adam=True, max_nonfinite=3, check_every=4)
    trainer.step(image, mask)  # Adam's state exists from here on
    with caplog.at_level(logging.WARNING, logger="pyroseg.train"):
        for batch in (bad, bad, image):  # steps 2-4: the check after step 4 logs the 2 skipped
            weights, adam = copy.deepcopy(trainer.model.state_dict()), _adam_state(trainer)
            out = trainer.step(batch, mask)
            same = all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
            after = _adam_state(trainer)
            same_adam = all(torch.equal(after[i][k], adam[i][k]) for i in adam for k in adam[i])
            assert out.applied == (batch is image) and same == same_adam == (batch is bad)
    assert (trainer.nonfinite_streak, trainer.nonfinite_total) == (0, 2)
    assert int(trainer.optimizer.state_dict()["state"][0]["step"]) == 2  # the two good steps only
    assert [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()] == [
        "non-finite loss or gradient in 2 of the steps since the last check: skipped (0 in a row now, at most 2 in a row)"]
    # three in a row, then a good step, all before the next check (after step 8): caught there
    for batch in (bad, bad, bad):
        trainer.step(batch, mask)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row .*--max-nonfinite 3"):
        trainer.step(image, mask)
    assert trainer.nonfinite_total == 5


def test_fused_and_loop_guard_skip_the_same_steps():
    """The same batches, NaN in some: the fused trainer (decision on the device)
    and the loop trainer (decision on the host) apply the same steps and end at the
    same weights (to fused Adam's rounding)."""
    pyro.set_rng_seed(0)
    base = build_model("prob_unet", image_size=H, widths=W)
    image, mask = _batch()
    bad = image.clone()
    bad[1, 2, 3, 4] = float("inf")
    fused = Trainer(copy.deepcopy(base), fused_adam=True, check_every=100)
    loop = Trainer(copy.deepcopy(base))
    batches = [image, bad, image, bad, bad, image]
    applied = {}
    for name, t in (("fused", fused), ("loop", loop)):
        pyro.set_rng_seed(1)
        applied[name] = [t.step(b, mask).applied for b in batches]
    assert applied["fused"] == applied["loop"] == [True, False, True, False, False, True]
    assert fused.nonfinite_total == loop.nonfinite_total == 3
    for (n, p), q in zip(fused.model.named_parameters(), loop.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=n)


def test_optimizer_state_moves_between_fused_and_loop_trainers():
    """A checkpoint of a loop-Adam trainer (CPU) loads into a fused one (a GPU's
    default) and back; both step on from it."""
    pyro.set_rng_seed(0)
    image, mask = _batch()
    loop = Trainer(build_model("unet", image_size=H, widths=W))
    loop.step(image, mask)
    fused = Trainer(copy.deepcopy(loop.model), fused_adam=True, check_every=5)
    fused.load_state_dict(loop.state_dict())
    assert fused.optimizer.param_groups[0]["fused"]
    assert fused.step(image, mask).applied and int(fused.optimizer.state_dict()["state"][0]["step"]) == 2
    back = Trainer(copy.deepcopy(fused.model))
    back.load_state_dict(fused.state_dict())
    assert not back.optimizer.param_groups[0]["fused"]
    assert back.step(image, mask).applied and int(back.optimizer.state_dict()["state"][0]["step"]) == 3


def test_check_every_must_be_positive():
    with pytest.raises(ValueError, match="check_every"):
        Trainer(build_model("unet", image_size=H, widths=W), check_every=0)
