"""The ``options`` item: each speed option of the library, on against off, interleaved in one process.

``off_over_on > 1`` means the option pays (the step or call is that many times
slower without it). Options, with what turns each off:

* ``validation off`` in training steps (``Trainer(validate=True)`` turns Pyro's checks on);
* ``analytic KL`` (``--elbo meanfield``, the default, vs ``--elbo trace``);
* ``inference_mode`` around sampling (vs ``no_grad`` and vs autograd on);
* ``hprob_unet shared sampling`` (``sample`` vs ``sample_reference``);
* ``channels_last`` memory format for training (``fit`` default; ``--no-channels-last``);
* ``fused Adam`` (``Trainer(fused_adam=True)``, opt-in);
* ``torch.compile`` of the networks (``Trainer(compile=True)``, experimental; with ``--with-compile``).
"""

from __future__ import annotations

import copy
import logging
import time

import pyro
import torch

from benchmarks.common import Settings, interleave, median, median_ratio, random_batch, sync
from pyroseg.models import build_model
from pyroseg.train import Trainer

__all__ = ["run"]

log = logging.getLogger(__name__)


def _row(option, model, measures, times, on, off, *, default, flag, note="") -> dict:
    return {
        "option": option,
        "model": model,
        "measures": measures,
        "on_ms": 1e3 * median(times[on]),
        "off_ms": 1e3 * median(times[off]),
        "off_over_on": median_ratio(times[off], times[on]),
        "default": default,
        "flag": flag,
        "note": note,
    }


def _trainers(name: str, size: int, device, **variants) -> dict:
    """One Trainer per variant, each on its own copy of one freshly built model;
    a variant is ``Trainer`` keyword arguments plus ``channels_last``."""
    pyro.set_rng_seed(0)
    base = build_model(name, image_size=size).to(device)
    out = {}
    for key, kw in variants.items():
        kw = dict(kw)
        cl = kw.pop("channels_last", False)
        m = copy.deepcopy(base)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        out[key] = (Trainer(m, **kw), cl)
    return out


def _step_fns(trainers: dict, image, mask) -> dict:
    fns = {}
    for key, (tr, cl) in trainers.items():
        x = image.contiguous(memory_format=torch.channels_last) if cl else image
        fns[key] = (lambda tr=tr, x=x: tr.step(x, mask, beta=1.0))
    return fns


def run(s: Settings) -> dict:
    rows = []
    dev, size, reps, warm = s.device, s.overhead_size, s.options_repeats, s.overhead_warmup
    image, mask = random_batch(s.batch, size, device=dev)
    step = f"training step, batch {s.batch}, {size}x{size}"

    # Pyro validation and the ELBO, on the model with a latent
    for name in ("prob_unet", "hprob_unet") if not s.quick else ("prob_unet",):
        tr = _trainers(name, size, dev, default={}, validate={"validate": True}, trace={"elbo": "trace"})
        t = interleave(_step_fns(tr, image, mask), warmup=warm, repeats=reps, device=dev)
        rows.append(_row("Pyro validation off in training", name, step, t, "default", "validate",
                         default="on (validation off)", flag="Trainer(validate=True)"))
        rows.append(_row("analytic KL (TraceMeanField_ELBO)", name, step, t, "default", "trace",
                         default="on", flag="--elbo trace",
                         note="also lower-variance gradients; Trace_ELBO's Monte Carlo KL is the alternative"))
        log.info("options %s: %s", name, rows[-2:])

    # memory format and optimiser, on the U-Net
    variants = {"default": {}, "channels_last": {"channels_last": True}, "fused": {"fused_adam": True}}
    tr = _trainers("unet", size, dev, **variants)
    t = interleave(_step_fns(tr, image, mask), warmup=warm, repeats=reps, device=dev)
    rows.append(_row("channels_last", "unet", step, t, "channels_last", "default",
                     default="on in fit", flag="--no-channels-last",
                     note="the torch.profiler table suggested the opposite: per-op profiler overhead misleads here"))
    rows.append(_row("fused Adam", "unet", step, t, "fused", "default", default="off", flag="Trainer(fused_adam=True) turns it on",
                     note="updates differ from pyro.optim.Adam by up to ~3e-6 where gradients are near eps"))

    # sampling: inference_mode, and hprob_unet's shared sampling
    pyro.set_rng_seed(0)
    n = max(s.sample_ns)
    for name in ("prob_unet", "hprob_unet"):
        # hprob_unet: the v1 layout, the one whose sample shares work beyond the prior encoder
        # (for the default reference layout sample and sample_reference are the same path)
        extra = {"layout": "v1"} if name == "hprob_unet" else {}
        model = build_model(name, image_size=s.sample_size, **extra).to(dev).eval()
        x = torch.rand(s.sample_images, 3, s.sample_size, s.sample_size, device=dev)

        def grad_on(model=model, x=x):
            with torch.enable_grad():
                return model.sample(x, n)

        def no_grad(model=model, x=x):
            with torch.no_grad():
                return model.sample(x, n)

        def inference(model=model, x=x):
            with torch.inference_mode():
                return model.sample(x, n)

        fns = {"inference": inference, "no_grad": no_grad, "grad": grad_on}
        if name == "hprob_unet":
            for k in (1, n):
                fns[f"shared{k}"] = lambda model=model, x=x, k=k: _inference(model.sample, x, k)
                fns[f"reference{k}"] = lambda model=model, x=x, k=k: _inference(model.sample_reference, x, k)
        t = interleave(fns, warmup=s.sample_warmup, repeats=reps, device=dev)
        what = f"sample(image, {n}), {s.sample_images} image(s) of {s.sample_size}x{s.sample_size}"
        rows.append(_row("inference_mode (vs no_grad)", name, what, t, "inference", "no_grad",
                         default="on in predict_dataset, evaluate, sample, plots, SegModel.predict",
                         flag="call model.sample yourself"))
        rows.append(_row("no autograd (vs autograd on)", name, what, t, "inference", "grad",
                         default="on", flag="call model.sample under torch.enable_grad()"))
        if name == "hprob_unet":
            for k in (1, n):
                rows.append(_row("hprob_unet shared sampling", name, f"sample(image, {k})", t, f"shared{k}", f"reference{k}",
                                 default="on", flag="model.sample_reference(image, n)",
                                 note="z-independent parts once per image; conv of upsampled input as 2x2 phase convs"))

    if s.compile:
        rows.append(_compile_row(s, image, mask))
    return {
        "what": f"interleaved in one process, {reps} repeats; off_over_on = median of per-round (off time / on time); "
                "> 1 means the option pays",
        "rows": rows,
    }


def _inference(fn, x, k):
    with torch.inference_mode():
        return fn(x, k)


def _compile_row(s: Settings, image, mask) -> dict:
    """``torch.compile`` of the U-Net's networks: compile time, then steps against eager."""
    dev, size = s.device, s.overhead_size
    tr = _trainers("unet", size, dev, eager={}, compiled={"compile": True})  # compiled lazily, at the first step
    fns = _step_fns(tr, image, mask)
    sync(dev)
    t0 = time.perf_counter()
    fns["compiled"]()  # compiles forward and backward
    sync(dev)
    compile_s = time.perf_counter() - t0
    t = interleave(fns, warmup=s.overhead_warmup, repeats=s.options_repeats, device=dev)
    row = _row("torch.compile", "unet", f"training step, batch {s.batch}, {size}x{size}", t, "compiled", "eager",
               default="off", flag="Trainer(compile=True) turns it on")
    row["note"] = f"first step (compiling) took {compile_s:.1f} s"
    return row
