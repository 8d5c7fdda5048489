"""The ``sampling`` item: the cost of ``model.sample(image, n)`` for n = 1, 16, 100, every model,
under ``torch.inference_mode()`` as the library's prediction paths run it.

Targets: ``prob_unet`` 100 samples <= 1.5x its 1-sample time (was 2x before its CPU
f_comb took the features-as-rows layout); ``hprob_unet``
<= 100x / 4 = 25x. The per-sample cost and the once-per-image cost come from a
straight line through the times: ``t(n) ~ once + n * per_sample``.
"""

from __future__ import annotations

import logging

import pyro
import torch

from benchmarks.common import Settings, interleave, median, median_ratio

__all__ = ["run", "TARGETS", "LIMITS"]

log = logging.getLogger(__name__)

TARGETS = {"prob_unet": 1.5, "hprob_unet": 25.0}  # t(100) / t(1)

#: What each model computes once per image and what it computes per sample.
LIMITS = {
    "unet": "no latent: one forward pass, the n 'samples' are the same map (an expand, no copy)",
    "vae": "the encoder runs once; the whole decoder (no skips) runs once per sample",
    "skip_vae": "the encoder runs once; the decoder (with skips and z at every level) runs once per sample",
    "hvae": "the encoder runs once; the latent chain and the whole decoder run once per sample",
    "prob_unet": "U-Net and prior net run once; per sample only f_comb's three 1x1 layers, as matrix products over "
                 "pixels (on CPU (K, K) @ (K, samples x pixels) into two reused buffers of 2 MiB per thread; on a GPU one chunk); "
                 "the (16, 16) product is most of it",
    "hprob_unet": "prior encoder, skip and bottleneck parts of the first convolutions run once; per sample the "
                  "latent part of the decoder at 1/4, 1/2 and full resolution (GroupNorm makes it nonlinear in z)",
}


def run(s: Settings) -> dict:
    from pyroseg.models import build_model

    rows = []
    n1 = min(s.sample_ns)
    for name in s.models:
        pyro.set_rng_seed(0)
        model = build_model(name, image_size=s.sample_size).to(s.device).eval()
        image = torch.rand(s.sample_images, 3, s.sample_size, s.sample_size, device=s.device)

        def call(n, model=model, image=image):
            with torch.inference_mode():
                return model.sample(image, n)

        fns = {n: (lambda n=n: call(n)) for n in s.sample_ns}
        times = interleave(fns, warmup=s.sample_warmup, repeats=s.sample_repeats, device=s.device)
        med = {n: median(times[n]) for n in s.sample_ns}
        ns = sorted(s.sample_ns)
        per_sample = (med[ns[-1]] - med[ns[0]]) / (ns[-1] - ns[0]) if len(ns) > 1 else float("nan")
        row = {
            "model": name,
            **{f"ms_n{n}": 1e3 * med[n] for n in ns},
            **{f"ratio_n{n}": median_ratio(times[n], times[n1]) for n in ns if n != n1},
            "per_sample_ms": 1e3 * per_sample,
            "once_ms": 1e3 * (med[ns[0]] - ns[0] * per_sample),
            "limit": LIMITS.get(name, ""),
        }
        top = max(ns)
        if name in TARGETS and top == 100:
            row["target_ratio_n100"] = TARGETS[name]
            row["meets_target"] = row["ratio_n100"] <= TARGETS[name]
        rows.append(row)
        log.info("sampling %s: %s", name, {n: round(1e3 * med[n], 1) for n in ns})
    return {
        "what": f"model.sample(image, n) for {s.sample_images} image(s) of {s.sample_size}x{s.sample_size} under "
                f"inference_mode, eval mode, {s.sample_repeats} interleaved repeats after {s.sample_warmup} warm-up; "
                "ratio = median of per-round t(n)/t(1)",
        "targets": {k: f"t(100) <= {v:g} x t(1)" for k, v in TARGETS.items()},
        "rows": rows,
    }
