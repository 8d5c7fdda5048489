"""The in-memory dataset every source produces, and its torch ``Dataset`` view.

A :class:`SegData` holds every slice of a data source at the training size:

* ``images``: ``uint8`` array ``(N, C, H, W)``, C = 3 (pre-contrast, FLAIR,
  post-contrast), scaled to [0, 1] only when a batch is made;
* ``masks``: ``uint8`` array ``(N, A, H, W)`` of 0/1, one mask per annotator
  (A = 1 for the LGG data, A > 1 for multi-annotator sources);
* ``patients``: ``(N,)`` patient id of every slice, and ``slice_numbers``: ``(N,)``
  the slice's number within its patient (as in the file name);
* ``rater_counts``: ``(N,)`` int, how many of the ``A`` masks of each slice are
  real raters. Sources with a different number of raters per case (QUBIQ
  prostate has a case with 5 of 6) pad ``masks`` with empty masks after the
  real ones; every consumer (the training draw, every metric) reads only the
  first ``rater_counts[i]`` masks of slice ``i``, so a padded mask is never
  scored and no rater is ever duplicated. ``None`` (the default) means every
  slice has all ``A``.

Storing ``uint8`` keeps a 256x256 copy of the whole LGG set under 1 GiB and lets
the cache load with one ``np.load``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SegData", "SegDataset", "collate_batch", "draw_rater", "rater_pairs"]


@dataclass
class SegData:
    images: np.ndarray  # (N, C, H, W) uint8
    masks: np.ndarray  # (N, A, H, W) uint8 in {0, 1}
    patients: np.ndarray  # (N,) str
    slice_numbers: np.ndarray  # (N,) int
    source: str = ""
    meta: dict = field(default_factory=dict)
    rater_counts: np.ndarray | None = None  # (N,) int in [1, A]; None: all A (filled in by __post_init__)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.masks.ndim != 4:
            raise ValueError(
                f"images must be (N, C, H, W) and masks (N, A, H, W); got {self.images.shape} and {self.masks.shape}"
            )
        if not (len(self.masks) == len(self.patients) == len(self.slice_numbers) == n):
            raise ValueError(
                f"length mismatch: {n} images, {len(self.masks)} masks, {len(self.patients)} patient ids, "
                f"{len(self.slice_numbers)} slice numbers"
            )
        if self.images.shape[2:] != self.masks.shape[2:]:
            raise ValueError(f"images are {self.images.shape[2:]} but masks are {self.masks.shape[2:]}")
        a = self.masks.shape[1]
        if self.rater_counts is None:
            self.rater_counts = np.full(n, a, dtype=np.int64)
        self.rater_counts = np.asarray(self.rater_counts, dtype=np.int64)
        if self.rater_counts.shape != (n,):
            raise ValueError(f"rater_counts must be (N,) = ({n},), got {self.rater_counts.shape}")
        if n and (self.rater_counts.min() < 1 or self.rater_counts.max() > a):
            raise ValueError(f"rater_counts must lie in [1, {a}], got {self.rater_counts.min()}..{self.rater_counts.max()}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_annotators(self) -> int:
        return int(self.masks.shape[1])

    @property
    def uniform_raters(self) -> bool:
        """True when every slice has all ``A`` raters (no padded masks)."""
        return bool((self.rater_counts == self.num_annotators).all())

    def rater_valid(self) -> np.ndarray:
        """``(N, A)`` bool: which masks of each slice are real raters (not padding)."""
        return np.arange(self.num_annotators)[None, :] < self.rater_counts[:, None]

    @property
    def patient_ids(self) -> list[str]:
        """Distinct patient ids in order of first appearance."""
        return list(dict.fromkeys(self.patients.tolist()))

    def patient_mask(self, patients: Sequence[str]) -> np.ndarray:
        """``(N,)`` bool: which slices belong to the given patients."""
        # a set, not np.isin(..., dtype=self.patients.dtype): '<U2' would cut 'p1_x' to 'p1', a false match
        wanted = set(patients)
        return np.fromiter((p in wanted for p in self.patients.tolist()), dtype=bool, count=len(self.patients))

    def subset(self, patients: Sequence[str]) -> SegData:
        """The slices of the given patients, in this dataset's order."""
        keep = self.patient_mask(patients)
        return SegData(
            images=self.images[keep],
            masks=self.masks[keep],
            patients=self.patients[keep],
            slice_numbers=self.slice_numbers[keep],
            source=self.source,
            meta=dict(self.meta),
            rater_counts=self.rater_counts[keep],
        )

    def summary(self) -> dict:
        """Counts a person wants to see before training on this data."""
        lesion = self.masks.any(axis=(2, 3))  # (N, A); a reshape(N, A, -1) fails when N = 0
        return {
            "source": self.source,
            "n_patients": len(self.patient_ids),
            "n_slices": len(self),
            "image_size": self.image_size,
            "channels": int(self.images.shape[1]),
            "annotators": self.num_annotators,
            "raters_per_slice": [int(self.rater_counts.min()), int(self.rater_counts.max())] if len(self) else [0, 0],
            **({"intensity": self.meta["intensity"]} if "intensity" in self.meta else {}),
            **({k: self.meta[k] for k in ("task", "slice_axis") if k in self.meta}),
            "slices_with_lesion": int(lesion[:, 0].sum()) if len(self) else 0,
            "lesion_pixel_fraction": float(self.masks[:, 0].mean()) if len(self) else 0.0,
        }


class SegDataset(Dataset):
    """A torch view of a :class:`SegData`, with the arrays held as tensors in memory.

    ``__getitems__`` returns a whole batch with one indexing operation (the
    :class:`~torch.utils.data.DataLoader` calls it when present), so loading costs
    nothing next to a training step. Each item is a dict:

    * ``image``: float ``(C, H, W)`` in [0, 1];
    * ``mask``: float ``(1, H, W)`` in {0, 1}: the annotator chosen for this draw
      (when ``random_annotator``, one drawn uniformly from the slice's own
      ``rater_counts[i]`` raters, never a padded mask; else the first);
    * ``masks``: float ``(A, H, W)``, every annotator (padded slots empty);
    * ``rater_count``: long ``()``, how many of ``masks`` are real raters;
    * ``index``: the slice's index in the :class:`SegData`.

    No augmentation is applied, ever: validation and test data must be the data.
    """

    def __init__(self, data: SegData, indices: Sequence[int] | None = None, *, random_annotator: bool = False):
        self.data = data
        self.indices = torch.arange(len(data)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
        self.images = torch.from_numpy(np.ascontiguousarray(data.images))
        self.masks = torch.from_numpy(np.ascontiguousarray(data.masks))
        self.counts = torch.from_numpy(np.ascontiguousarray(data.rater_counts))
        self.random_annotator = random_annotator

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, items: Sequence[int]) -> dict:
        idx = self.indices[torch.as_tensor(list(items), dtype=torch.long)]
        image = self.images[idx].float().div_(255.0)  # (B, C, H, W)
        masks = self.masks[idx].float()  # (B, A, H, W)
        counts = self.counts[idx]  # (B,)
        pick = draw_rater(counts, masks.shape[1], self.random_annotator)
        mask = masks[torch.arange(len(idx)), pick].unsqueeze(1)  # (B, 1, H, W)
        return {"image": image, "mask": mask, "masks": masks, "rater_count": counts, "index": idx}


def draw_rater(counts: torch.Tensor, num_annotators: int, random: bool) -> torch.Tensor:
    """``(B,)`` long: the annotator each slice's training mask comes from, given each
    slice's rater count ``counts`` ``(B,)`` (CPU): uniform over the slice's own raters,
    drawn from the global CPU random stream, when ``random``; else the first.
    :class:`SegDataset` and :class:`pyroseg.data.device.DeviceBatches` both draw here,
    so the two paths give the same masks and leave the stream in the same state."""
    b = len(counts)
    if not random or num_annotators == 1:
        return torch.zeros(b, dtype=torch.long)
    if bool((counts == num_annotators).all()):
        return torch.randint(num_annotators, (b,))  # the same draws as before counts existed
    return (torch.rand(b) * counts).long().clamp_max_(counts - 1)


def rater_pairs(image: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, rater) pair of a batch: ``image`` ``(B, C, H, W)``, ``masks`` ``(B, A, H, W)``
    whose first ``counts[i]`` are slice ``i``'s real raters -> ``(P, C, H, W)``, ``(P, 1, H, W)``,
    ``P = counts.sum()``, slice-major (slice 0's raters first)."""
    real = torch.arange(masks.shape[1], device=masks.device)[None, :] < counts[:, None]  # (B, A)
    pairs = image.unsqueeze(1).expand(-1, masks.shape[1], *image.shape[1:])[real]  # (P, C, H, W)
    return pairs, masks[real].unsqueeze(1)


def collate_batch(batch: dict) -> dict:
    """Collate for :class:`SegDataset`: ``__getitems__`` already returns a batch."""
    return batch
