"""Training batches gathered on the device: the data stays where the model is.

:class:`DeviceBatches` is a drop-in for the training ``DataLoader`` of
:func:`pyroseg.train.fit` (a :class:`~pyroseg.data.SegDataset` with
``random_annotator``, a sampler, ``collate_batch``, no workers). It copies the
dataset's ``uint8`` arrays to the device once and makes every batch there by
indexing, so a step waits for no host-to-device copy and no loader round trip:

* the order is the sampler's, taken once per epoch (``iter(sampler)``, so
  :class:`~pyroseg.train.EpochSampler`'s position and mid-epoch ``skip`` apply)
  and copied to the device once per epoch;
* batch ``i`` is ``order[i B : (i + 1) B]`` (the last one shorter, as the
  ``DataLoader`` without ``drop_last``);
* the random annotator of each slice is drawn exactly as
  :meth:`SegDataset.__getitems__` draws it: ``torch.randint(A, (B,))`` from the
  global CPU generator at the moment the batch is made (only when ``A > 1``),
  then copied to the device. So the batches, and every later random draw, are
  those of the ``DataLoader`` path: a resumed run stays exact, and on CPU the two
  paths give identical batches (``tests/test_device_data.py``).

Each batch is the same dict as ``SegDataset``'s: ``image`` float ``(B, C, H, W)``
in [0, 1], ``mask`` float ``(B, 1, H, W)``, ``masks`` float ``(B, A, H, W)``,
``index`` long ``(B,)``, all on the device.

:func:`on_device` decides (``--data-on-device auto|on|off``): ``auto`` keeps the
data on a CUDA device when its ``uint8`` arrays take under
:data:`AUTO_FRACTION` of the free device memory (the LGG copy at 64x64 is
~100 MB; an H200 has ~140 GB).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from pyroseg.config import DATA_ON_DEVICE
from pyroseg.data.core import SegDataset, draw_rater
from pyroseg.errors import UsageError

__all__ = ["DeviceBatches", "on_device", "fits_on_device", "AUTO_FRACTION", "CHOICES"]

log = logging.getLogger(__name__)

#: ``auto`` puts the data on the device when it takes under this share of the free memory.
AUTO_FRACTION = 0.25
CHOICES = DATA_ON_DEVICE  # --data-on-device, defined beside its FitConfig field


class DeviceBatches:
    """Iterate over ``dataset`` in ``sampler``'s order, ``batch_size`` slices at a
    time, with the arrays resident on ``device`` (see the module docs)."""

    def __init__(self, dataset: SegDataset, sampler, batch_size: int, device: torch.device | str):
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)  # (N, C, H, W) uint8
        self.masks = dataset.masks.to(self.device)  # (N, A, H, W) uint8
        self.indices = dataset.indices  # (n,) long, CPU: dataset position -> slice
        self.num_annotators = int(self.masks.shape[1])

    def __len__(self) -> int:
        n = len(self.sampler)
        return (n + self.batch_size - 1) // self.batch_size

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: the copy does not wait for the queued work
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def __iter__(self):
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)  # dataset positions, this epoch
        slices_cpu = self.indices[order]  # (n,) slice indices
        slices = self._to_device(slices_cpu)  # the same, on the device
        for start in range(0, len(order), self.batch_size):
            idx = slices[start : start + self.batch_size]  # (B,)
            counts = self.dataset.counts[slices_cpu[start : start + self.batch_size]]  # (B,) raters per slice, CPU
            image = self.images[idx].float().div_(255.0)  # (B, C, H, W)
            masks = self.masks[idx].float()  # (B, A, H, W)
            # the CPU generator, as SegDataset draws it: the same annotators, the same later draws
            pick = self._to_device(draw_rater(counts, self.num_annotators, self.dataset.random_annotator))
            mask = masks[torch.arange(len(idx), device=self.device), pick].unsqueeze(1)  # (B, 1, H, W)
            yield {"image": image, "mask": mask, "masks": masks, "rater_count": self._to_device(counts), "index": idx}


def fits_on_device(dataset: SegDataset, device: torch.device, fraction: float = AUTO_FRACTION) -> bool:
    """Whether the dataset's ``uint8`` arrays take under ``fraction`` of the free
    memory of CUDA ``device`` (False for any other device)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    need = dataset.images.nbytes + dataset.masks.nbytes
    return need < fraction * free


def on_device(loader: DataLoader, device: torch.device, mode: str = "auto"):
    """``loader`` itself, or a :class:`DeviceBatches` over its dataset, sampler and
    batch size when ``mode`` is ``on``, or ``auto`` and the data fits on a CUDA
    ``device`` (:func:`fits_on_device`)."""
    if mode not in CHOICES:
        raise UsageError(f"--data-on-device {mode!r}: expected one of {', '.join(CHOICES)}")
    if mode == "off" or (mode == "auto" and not fits_on_device(loader.dataset, device)):
        return loader
    if not isinstance(loader.dataset, SegDataset) or loader.sampler is None or loader.batch_size is None:
        raise UsageError("--data-on-device on: needs the training loader of a SegDataset with a sampler and a batch size")
    log.info("training data on %s (%.1f MB)", device, (loader.dataset.images.nbytes + loader.dataset.masks.nbytes) / 1e6)
    return DeviceBatches(loader.dataset, loader.sampler, loader.batch_size, device)
