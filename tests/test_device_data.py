"""Training batches gathered on the device (pyroseg.data.device), checked on CPU
against the DataLoader path they replace."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyroseg.config import FitConfig
from pyroseg.data import SegData, SegDataset, collate_batch
from pyroseg.data.device import DeviceBatches, on_device
from pyroseg.errors import UsageError
from pyroseg.train import EpochSampler, fit


def _data(n=23, annotators=3, size=8, seed=0, uneven=False) -> SegData:
    """``uneven``: every third slice has one rater fewer (its last slot padded empty)."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, annotators, size, size)) > 0.7).astype(np.uint8)
    counts = np.full(n, annotators)
    if uneven:
        counts[::3] = annotators - 1
        masks[::3, -1] = 0
    return SegData(
        images=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
        masks=masks,
        patients=np.array([f"p{i // 4}" for i in range(n)]),
        slice_numbers=np.arange(n),
        rater_counts=counts,
    )


def _loader(dataset, sampler, batch):
    return DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=collate_batch,
                      generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("annotators, indices, uneven", [(3, None, False), (1, None, False),
                                                         (3, [5, 0, 7, 9, 2, 11, 13, 1, 4], False), (3, None, True)])
def test_device_batches_equal_the_dataloader_batches_and_random_draws(annotators, indices, uneven):
    """Epoch by epoch, from a mid-epoch position too: the same batches (values,
    dtype, annotator drawn, raters per slice) and the global random stream left in the
    same state; with uneven rater counts a padded slot is never drawn."""
    data = _data(annotators=annotators, uneven=uneven)
    dataset = SegDataset(data, indices=indices, random_annotator=True)
    runs = {}
    for kind in ("loader", "device"):
        sampler = EpochSampler(dataset, seed=3)
        it = _loader(dataset, sampler, 4) if kind == "loader" else DeviceBatches(dataset, sampler, 4, "cpu")
        torch.manual_seed(7)
        batches = []
        for epoch, skip in ((0, 0), (1, 0), (2, 2 * 4)):  # the third as a resume at batch 2 does it
            sampler.set_position(epoch, skip=skip)
            batches += list(it)
            batches.append({"after": torch.rand(3)})  # what the step would draw next
        runs[kind] = batches
    n = len(dataset)
    assert len(runs["loader"]) == len(runs["device"]) == 2 * -(-n // 4) + -(-(n - 8) // 4) + 3
    for a, b in zip(runs["loader"], runs["device"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    if annotators > 1:  # the annotator draw is real: not always the first
        picks = [bool((b["mask"][:, 0] != b["masks"][:, 0]).flatten(1).any(1).any()) for b in runs["device"] if "mask" in b]
        assert any(picks)
    if uneven:  # a slice with 2 raters never trains on its empty third slot
        for b in runs["device"]:
            if "mask" in b:
                short = b["rater_count"] == annotators - 1
                assert not torch.equal(b["mask"][short, 0], b["masks"][short, -1]) or not b["masks"][short, :-1].any()


def test_device_batches_length_follows_the_sampler():
    dataset = SegDataset(_data(n=10), random_annotator=True)
    sampler = EpochSampler(dataset, seed=0)
    it = DeviceBatches(dataset, sampler, 4, "cpu")
    assert len(it) == 3
    sampler.set_position(0, skip=4)
    assert len(it) == 2 and [len(b["index"]) for b in it] == [4, 2]


def test_on_device_decides_by_mode():
    dataset = SegDataset(_data(), random_annotator=True)
    loader = _loader(dataset, EpochSampler(dataset, seed=0), 4)
    assert on_device(loader, torch.device("cpu"), "off") is loader
    assert on_device(loader, torch.device("cpu"), "auto") is loader  # auto: CUDA only
    assert isinstance(on_device(loader, torch.device("cpu"), "on"), DeviceBatches)
    with pytest.raises(UsageError, match="--data-on-device 'yes'"):
        on_device(loader, torch.device("cpu"), "yes")
    with pytest.raises(UsageError, match="--data-on-device 'yes'"):
        FitConfig(data_on_device="yes").validate()


def test_fit_with_data_on_device_trains_to_the_same_weights(tmp_path):
    """--data-on-device on (CPU) and off: the same run, weight for weight, on
    multi-annotator data (where the annotator draw shares the random stream with
    the model's noise)."""
    tiny = dict(model="prob_unet", data="synthetic-ambiguous", image_size=32, epochs=1, batch_size=8, synthetic_patients=4,
                synthetic_slices=6, widths=(8, 16, 32, 64), val_samples=1, device="cpu", collapse_diagnostics=False)
    states = {}
    for mode in ("off", "on"):
        run = fit(FitConfig(out=str(tmp_path / mode), data_on_device=mode, **tiny), pictures=False)
        states[mode] = torch.load(run / "checkpoint.pt", weights_only=True)
    def untimed(history):
        return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in history]

    assert untimed(states["on"]["history"]) == untimed(states["off"]["history"])
    for k, v in states["off"]["model_state"].items():
        assert torch.equal(states["on"]["model_state"][k], v), k
