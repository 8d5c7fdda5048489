"""One measurement in a fresh process, so that its peak memory is its own.

``python -m benchmarks.worker '<json spec>'`` prints one JSON line. Kinds:

* ``train``: ``warmup + repeats`` timed calls of ``block`` training steps each
  (default 1; the suite uses 20 on a GPU) of ``model`` on one fixed batch
  (``model = "plain_unet"``: the hand-written PyTorch U-Net step; ``"unet@host_sync"``:
  pyroseg's earlier step, which reads the loss on the host); reports the
  median step time, images per second and peak memory;
* ``epoch``: training epochs over real slices (the LGG copy, or synthetic data),
  through the same data set-up as :func:`pyroseg.train.fit` (the DataLoader, or
  the batches made on the device with ``data_on_device``), timing the time spent
  waiting for the next batch apart from the steps. ``sync_steps`` (default: on
  CPU only) waits for the device after every step; without it the wait is the
  host time spent getting a batch (on a GPU what the loop loses to the data).

Peak memory: ``ru_maxrss`` of this process (CPU; ``baseline_rss_mib`` is the
figure before the model was built) or ``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import json
import sys
import time

import torch

#: a model name ending in this trains with pyroseg's earlier step, which waits for the host
#: (:mod:`benchmarks.host_sync_step`)
HOST_SYNC = "@host_sync"


def _setup(spec: dict):
    import pyro

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    pyro.set_rng_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return device


def _memory(device, baseline: float) -> dict:
    from benchmarks.common import peak_rss_mib

    out = {"peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _stepper(name: str, size: int, device, options: dict):
    from benchmarks.plain import PlainStep
    from pyroseg.models import build_model
    from pyroseg.train import Trainer

    if name == "plain_unet":
        plain = PlainStep(_as_fit_does(build_model("unet", image_size=size).to(device), options))
        return lambda image, mask: plain.step(image, mask, 1.0)
    if name.endswith(HOST_SYNC):  # the earlier, host-sync step (benchmarks/host_sync_step.py)
        from benchmarks.host_sync_step import HostSyncTrainer

        model = build_model(name[: -len(HOST_SYNC)], image_size=size).to(device)
        trainer = HostSyncTrainer(_as_fit_does(model, options), **options)
        return lambda image, mask: trainer.step(image, mask, beta=1.0)
    trainer = Trainer(_as_fit_does(build_model(name, image_size=size).to(device), options), **options)
    return lambda image, mask: trainer.step(image, mask, beta=1.0)


def _as_fit_does(model, options: dict):
    """The model in the memory format :func:`pyroseg.train.fit` trains it in
    (``options["channels_last"]``, default: FitConfig's default)."""
    from pyroseg.config import FitConfig

    if options.pop("channels_last", FitConfig().channels_last):
        model = model.to(memory_format=torch.channels_last)
    return model


def train(spec: dict) -> dict:
    from benchmarks.common import median, peak_rss_mib, random_batch, timed

    device = _setup(spec)
    baseline = peak_rss_mib()
    size, batch = int(spec["size"]), int(spec["batch"])
    step = _stepper(spec["model"], size, device, dict(spec.get("options", {})))
    image, mask = random_batch(batch, size, device=device)
    block = int(spec.get("block", 1))

    def steps():
        for _ in range(block):
            step(image, mask)

    for _ in range(int(spec["warmup"])):
        steps()
    times = [timed(steps, device) / block for _ in range(int(spec["repeats"]))]
    t = median(times)
    return {**spec, "median_step_s": t, "images_per_s": batch / t, "times_s": times, **_memory(device, baseline)}


def load_data(spec: dict):
    """The training slices the benchmark trains on: the LGG copy's train split
    (as :func:`pyroseg.train.fit` splits it, seed 0) or a synthetic source."""
    from pyroseg.data import load_source, split_patients

    size = int(spec["size"])
    if spec.get("lgg_dir"):
        data = load_source(spec["lgg_dir"], size, cache_dir=spec.get("cache_dir"))
    else:
        data = load_source("synthetic", size, synthetic_patients=int(spec.get("synthetic_patients", 20)))
    split = split_patients(data.patient_ids, val_fraction=0.15, test_fraction=0.15, seed=0)
    return data.subset(split["train"])


def epoch(spec: dict) -> dict:
    """One warm-up of a few steps, then one timed epoch (or ``max_batches`` of it)."""
    from torch.utils.data import DataLoader

    from benchmarks.common import peak_rss_mib, sync
    from pyroseg.data import SegDataset, collate_batch
    from pyroseg.data.device import on_device
    from pyroseg.models import build_model
    from pyroseg.train import EpochSampler, Trainer

    device = _setup(spec)
    baseline = peak_rss_mib()
    size, batch = int(spec["size"]), int(spec["batch"])
    data = load_data(spec)
    n_all = len(data)
    n = int(spec["slices"]) if spec.get("slices") else max(1, round(float(spec.get("fraction", 1.0)) * n_all))
    n = min(n, n_all)
    options = dict(spec.get("options", {}))
    trainer = Trainer(_as_fit_does(build_model(spec["model"], image_size=size).to(device), options), **options)
    dataset = SegDataset(data, indices=range(n), random_annotator=True)
    sampler = EpochSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=collate_batch,
                        num_workers=int(spec.get("num_workers", 0)))
    loader = on_device(loader, device, spec.get("data_on_device", "off"))
    sync_steps = bool(spec.get("sync_steps", device.type == "cpu"))
    max_batches = spec.get("max_batches")

    def one_epoch(ep: int, limit) -> dict:
        sampler.set_position(ep)
        wait = step = 0.0
        images = batches = 0
        sync(device)
        t_start = time.perf_counter()
        it = iter(loader)
        while limit is None or batches < limit:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            image = b["image"].to(device, non_blocking=True)
            mask = b["mask"].to(device, non_blocking=True)
            t1 = time.perf_counter()
            trainer.step(image, mask, beta=1.0)
            if sync_steps:
                sync(device)
            t2 = time.perf_counter()
            wait += t1 - t0
            step += t2 - t1
            images += image.shape[0]
            batches += 1
        sync(device)
        total = time.perf_counter() - t_start
        return {"epoch_s": total, "data_wait_s": wait, "step_s": step, "images": images, "batches": batches}

    one_epoch(0, int(spec.get("warmup_batches", 2)))  # warm-up, not recorded
    r = one_epoch(1, int(max_batches) if max_batches else None)
    r["data_wait_share"] = r["data_wait_s"] / r["epoch_s"]
    r["images_per_s"] = r["images"] / r["epoch_s"]
    return {**spec, "slices": n, "train_slices_all": n_all, "batches_on_device": not isinstance(loader, DataLoader),
            "sync_steps": sync_steps, **r, **_memory(device, baseline)}


KINDS = {"train": train, "epoch": epoch}


def main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    out = KINDS[spec["kind"]](spec)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
