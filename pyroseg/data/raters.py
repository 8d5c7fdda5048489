"""What the multi-rater readers (:mod:`pyroseg.data.qubiq`, :mod:`pyroseg.data.lidc`) share.

* :func:`scale_intensity`: one rule per stored type, turning any image into the
  ``uint8`` that :class:`~pyroseg.data.core.SegData` keeps (see
  :data:`INTENSITY_RULES`);
* :func:`pad_square`: centre a non-square image on a square of zeros, so the
  area-averaging resize of :mod:`pyroseg.data.resize` applies;
* :class:`ItemStack`: collects ``(image, masks)`` items of any size and any
  number of raters into the padded ``(N, C, S, S)`` / ``(N, A, S, S)`` arrays
  and the ``(N,)`` rater counts;
* :func:`cached`: the LGG reader's ``.npz`` cache (same folder, same atomic
  write, same "unreadable cache is rebuilt" rule) for any reader's arrays.

``uint8`` is kept for CT too: the LIDC crops are floats in [0, 1], and
``round(255 x)`` moves a value by at most 1/510 of the crop's range (about
3 HU in the usual 1500 HU lung window), far below what a 128x128 crop resolves.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from pyroseg.data.lgg import default_cache_dir, read_npz, write_cache
from pyroseg.data.resize import resize_image, resize_mask
from pyroseg.errors import DataError

__all__ = ["scale_intensity", "pad_square", "check_item_size", "MAX_ITEM_VALUES", "ItemStack", "cached", "file_stamp", "rater_agreement", "disagreement_scales", "INTENSITY_RULES",
           "PERCENTILES"]

log = logging.getLogger(__name__)

#: Percentiles that map to 0 and 255 for images stored as anything but uint8 or [0, 1] floats.
PERCENTILES = (0.5, 99.5)

#: The rules of :func:`scale_intensity`, by the name recorded in ``SegData.meta["intensity"]``.
INTENSITY_RULES = {
    "uint8": "uint8 as stored",
    "unit": "floats in [0, 1] times 255, rounded",
    "percentile": f"per image (volume) and channel: the {PERCENTILES[0]}th..{PERCENTILES[1]}th percentiles "
                  "mapped linearly to 0..255, clipped outside",
}


def scale_intensity(image: np.ndarray, *, channels_last: bool = True) -> tuple[np.ndarray, str]:
    """``image`` as ``uint8``, and the name of the rule used.

    ``image``: any shape; its last axis is the channel axis when
    ``channels_last``, else every value is one channel (a grayscale volume).

    ``uint8`` stays as stored (QUBIQ's images); floats already in [0, 1] (the
    LIDC crops) become ``round(255 x)``; anything else (CT in HU, MRI in
    scanner units) is scaled per channel between its
    :data:`PERCENTILES` (computed over the whole image or volume, so every
    slice of a volume shares one scale). A constant channel becomes 0.
    """
    if image.dtype == np.uint8:
        return image, "uint8"
    x = np.asarray(image, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("holds NaN or infinite values")
    if np.issubdtype(image.dtype, np.floating) and x.size and x.min() >= 0.0 and x.max() <= 1.0:
        return np.floor(x * 255 + 0.5).astype(np.uint8), "unit"
    flat = x.reshape(-1, x.shape[-1]) if channels_last else x.reshape(-1, 1)
    lo, hi = np.percentile(flat, PERCENTILES, axis=0)  # (C,) each
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = np.clip((x.reshape(flat.shape) - lo) / span, 0, 1) * (hi > lo)
    return np.floor(scaled * 255 + 0.5).astype(np.uint8).reshape(x.shape), "percentile"


#: The most values (side x side x channels) an item may have once centred on its square: 8192^2 grey pixels.
#: A long thin crop (1 x 100,000, a few bytes in a file) would otherwise become a 10 GB square.
MAX_ITEM_VALUES = 2**26


def check_item_size(h: int, w: int, c: int = 1, *, source: object = None) -> None:
    """Raise :class:`~pyroseg.errors.DataError` when an ``(h, w, c)`` item, padded to a square, exceeds :data:`MAX_ITEM_VALUES`."""
    m = max(int(h), int(w))
    if m * m * max(int(c), 1) > MAX_ITEM_VALUES:
        where = f"{source}: " if source is not None else ""
        raise DataError(f"{where}an item of {h}x{w} pixels ({c} channel{'s' if c != 1 else ''}) is too large: centred on a "
                        f"{m}x{m} square it would exceed {MAX_ITEM_VALUES:,} values (expected at most 8192x8192 grey)")


def pad_square(x: np.ndarray) -> np.ndarray:
    """``x`` ``(H, W, ...)`` centred on a zero square ``(M, M, ...)``, ``M = max(H, W)``; unchanged when square."""
    h, w = x.shape[:2]
    if h == w:
        return x
    m = max(h, w)
    out = np.zeros((m, m, *x.shape[2:]), dtype=x.dtype)
    top, left = (m - h) // 2, (m - w) // 2
    out[top : top + h, left : left + w] = x
    return out


class ItemStack:
    """Items of any size and rater count, resized and stacked as :class:`SegData` arrays.

    ``add(image, masks, patient, slice_number)`` with ``image`` ``(H, W, C)``
    uint8 and ``masks`` ``(A_i, H, W)`` 0/1 (an item over :data:`MAX_ITEM_VALUES`
    is a :class:`~pyroseg.errors.DataError`, before anything is allocated); ``arrays()`` returns ``images``
    ``(N, C, S, S)`` uint8, ``masks`` ``(N, A, S, S)`` uint8 with ``A = max A_i``
    (slots past an item's own raters are empty), ``rater_counts`` ``(N,)``,
    ``patients``, ``slice_numbers``, ``original_sizes`` (distinct original
    sides, sorted) and ``image_size``.

    With ``capacity``, ``raters`` and ``channels`` known up front (a LIDC
    pickle: its record count and most masks), the output arrays are allocated
    once and filled in place, so ``arrays()`` copies nothing; otherwise items are
    kept in lists and stacked at the end.
    """

    def __init__(self, image_size: int, *, capacity: int | None = None, raters: int | None = None,
                 channels: int | None = None):
        self.size = image_size
        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.counts: list[int] = []
        self.patients: list[str] = []
        self.slice_numbers: list[int] = []
        self.sizes: set[tuple[int, int]] = set()
        self.fixed = None
        if capacity is not None and raters is not None and channels is not None:
            s = image_size
            self.fixed = (np.empty((capacity, channels, s, s), np.uint8), np.zeros((capacity, raters, s, s), np.uint8))

    def add(self, image: np.ndarray, masks: np.ndarray, patient: str, slice_number: int) -> None:
        check_item_size(*image.shape[:2], image.shape[2] if image.ndim > 2 else 1)
        self.sizes.add(tuple(int(v) for v in image.shape[:2]))
        img = resize_image(pad_square(image), self.size)  # (C, S, S)
        msk = np.stack([resize_mask(pad_square(m), self.size) for m in masks])  # (A_i, S, S)
        if self.fixed is not None:
            i = len(self.counts)
            if i >= len(self.fixed[0]) or msk.shape[0] > self.fixed[1].shape[1] or img.shape[0] != self.fixed[0].shape[1]:
                raise ValueError("more items, raters or channels than announced")
            self.fixed[0][i], self.fixed[1][i, : len(msk)] = img, msk
        else:
            self.images.append(img)
            self.masks.append(msk)
        self.counts.append(len(msk))
        self.patients.append(patient)
        self.slice_numbers.append(int(slice_number))

    def __len__(self) -> int:
        return len(self.counts)

    def arrays(self) -> dict[str, np.ndarray]:
        s, n = self.size, len(self)
        if self.fixed is not None:
            images, masks = self.fixed[0][:n], self.fixed[1][:n]
        else:
            channels = {im.shape[0] for im in self.images}
            if len(channels) > 1:
                raise ValueError(f"images have different numbers of channels {sorted(channels)}")
            c = channels.pop() if channels else 1
            a = max(self.counts, default=1)
            masks = np.zeros((n, a, s, s), dtype=np.uint8)
            for i, m in enumerate(self.masks):
                masks[i, : len(m)] = m
            images = np.stack(self.images) if n else np.zeros((0, c, s, s), np.uint8)
        return {
            "images": images,
            "masks": masks,
            "rater_counts": np.array(self.counts, dtype=np.int64),
            "patients": np.array(self.patients, dtype=str),
            "slice_numbers": np.array(self.slice_numbers, dtype=np.int64),
            "original_sizes": np.array(sorted({max(hw) for hw in self.sizes}), dtype=np.int64),
            "image_size": np.array(s, dtype=np.int64),
        }

    @staticmethod
    def concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The :meth:`arrays` of several stacks as one (masks padded to the most raters); one part: as is."""
        if len(parts) == 1:
            return parts[0]
        a = max(p["masks"].shape[1] for p in parts)
        pad = [np.pad(p["masks"], ((0, 0), (0, a - p["masks"].shape[1]), (0, 0), (0, 0))) for p in parts]
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("images", "rater_counts", "patients", "slice_numbers")}
        out["masks"] = np.concatenate(pad)
        out["original_sizes"] = np.unique(np.concatenate([p["original_sizes"] for p in parts]))
        out["image_size"] = parts[0]["image_size"]
        return out


_KEYS = ("images", "masks", "rater_counts", "patients", "slice_numbers", "original_sizes", "image_size", "intensity")


def file_stamp(paths: Iterable[Path], root: Path) -> list[str]:
    """``relative path, size, mtime_ns`` of each file (``stat`` only: nothing is opened)."""
    out = []
    for p in paths:
        st = p.stat()
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name
        out.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    return out


def cached(
    kind: str,
    key_parts: list[str],
    build: Callable[[], dict[str, np.ndarray]],
    *,
    image_size: int,
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays ``build()`` makes, from ``<cache_dir>/<kind>-<key16>.npz`` when it is there.

    The key is a sha256 over ``kind``, ``image_size`` and ``key_parts`` (file
    stamps and the options that change the arrays). A cache file that cannot
    be read or whose arrays do not fit together is logged and rebuilt; an
    unwritable cache folder is logged and skipped. Returns ``(arrays, hit)``.
    """
    path = None
    if use_cache:
        h = hashlib.sha256(f"pyroseg-{kind} v1 size={image_size}\n".encode())
        for part in key_parts:
            h.update(part.encode() + b"\n")
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = directory / f"{kind}-{h.hexdigest()[:16]}.npz"
        if path.is_file():
            try:
                arrays = read_npz(path)
                arrays = {k: arrays[k] for k in _KEYS}
                n = len(arrays["images"])
                ok = (arrays["images"].dtype == np.uint8 and arrays["masks"].dtype == np.uint8
                      and arrays["images"].shape[2:] == (image_size, image_size)
                      and arrays["masks"].shape[0] == n and arrays["masks"].shape[2:] == (image_size, image_size)
                      and arrays["rater_counts"].shape == arrays["patients"].shape == arrays["slice_numbers"].shape == (n,))
                if not ok:
                    raise ValueError("arrays have unexpected shapes or types")
                log.info("loaded %d slices from the cache %s", n, path)
                return arrays, True
            except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
                log.warning("ignoring unreadable cache file %s (%s: %s); rebuilding it", path, type(e).__name__, e)
    arrays = build()
    if path is not None:
        write_cache(path, arrays)
    return arrays, False


def rater_agreement(data, batch_size: int = 256) -> dict:
    """How many raters the cases have and how much they agree (``pyroseg inspect``).

    ``data``: a :class:`~pyroseg.data.core.SegData`. Returns ``raters_per_case``
    (``{count: number of cases}``, a case's count being its slices' most),
    ``pairwise_iou`` (mean over slices of the mean IoU over distinct pairs of the
    slice's raters, two empty masks agreeing fully; slices with one rater left
    out), ``pairwise_iou_marked`` (the same over slices some rater marks),
    ``marked_slices`` and ``lesion_fraction_per_rater`` (``(A,)``: mean marked
    fraction of each rater slot over the slices that have that rater).
    """
    import torch

    from pyroseg.metrics import pairwise_iou

    per_case: dict[str, int] = {}
    for p, n in zip(data.patients.tolist(), data.rater_counts.tolist()):
        per_case[p] = max(per_case.get(p, 0), int(n))
    counts_hist: dict[int, int] = {}
    for n in per_case.values():
        counts_hist[n] = counts_hist.get(n, 0) + 1
    values = np.full(len(data), np.nan)
    for i in range(0, len(data), batch_size):
        m = torch.from_numpy(data.masks[i : i + batch_size])
        c = data.rater_counts[i : i + batch_size]
        for n in np.unique(c):
            if n < 2:
                continue
            sel = np.flatnonzero(c == n)
            iou = pairwise_iou(m[sel, :n], m[sel, :n])  # (k, n, n)
            off = (iou.sum((-2, -1)) - iou.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
            values[i + sel] = off.double().numpy()
    marked = data.masks.reshape(len(data), data.num_annotators, -1).any(-1).any(-1)
    valid = data.rater_valid()
    frac = data.masks.reshape(len(data), data.num_annotators, -1).mean(-1)  # (N, A)
    with np.errstate(invalid="ignore"):
        per_rater = np.where(valid, frac, 0).sum(0) / valid.sum(0)
    return {
        "raters_per_case": dict(sorted(counts_hist.items())),
        "pairwise_iou": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
        "pairwise_iou_marked": float(np.nanmean(values[marked])) if np.isfinite(values[marked]).any() else float("nan"),
        "marked_slices": int(marked.sum()),
        "lesion_fraction_per_rater": [float(v) for v in per_rater],
    }


def disagreement_scales(data, grids: Iterable[int] = (8, 4, 2)) -> dict:
    """Where the raters disagree: globally (one number per rater would say it) or locally.

    For the slices where the raters (at least 3) disagree: ``global_level`` is the share of a
    rater's departure from the majority vote that the best *single level* of the raters' mean
    explains — pixels where the rater's mask differs from ``{mean >= t}`` for the best ``t``,
    against those where it differs from ``{mean >= 0.5}`` (the majority vote, as
    :func:`pyroseg.metrics.majority_vote`) — mean over raters and slices (1: the masks are
    nested, each a level set of the mean, so one global number per rater says everything; 0:
    their differences are local, e.g. each rater adds a region of their own). ``cells_<g>``:
    median number of cells of a ``g x g`` grid (a latent scale of ``g x g`` positions) that hold
    disagreeing pixels, out of ``g * g``. ``slices``: the slices measured.
    ``global_level`` tells whether ``hprob_unet``'s global ``z_4`` has anything to explain.
    """
    grids = list(grids)
    levels, cells, slices = [], {g: [] for g in grids}, 0
    for i in range(len(data)):
        n = int(data.rater_counts[i])
        if n < 3:
            continue
        m = data.masks[i, :n].astype(bool)  # (n, S, S)
        mean = m.mean(0)
        amb = (mean > 0) & (mean < 1)
        if not amb.any():
            continue
        slices += 1
        size = amb.shape[-1]
        for g in grids:
            c = size // g
            cells[g].append(int(amb[: g * c, : g * c].reshape(g, c, g, c).any((1, 3)).sum()))
        cuts = [mean >= k / n for k in range(1, n + 1)]  # the level sets of the raters' mean
        majority = mean >= 0.5
        for r in range(n):
            base = (m[r] ^ majority).sum()
            if base:
                best = min((m[r] ^ c).sum() for c in cuts)
                levels.append(1.0 - best / base)
    out: dict = {"slices": slices, "global_level": float(np.mean(levels)) if levels else float("nan")}
    for g in grids:
        out[f"cells_{g}"] = float(np.median(cells[g])) if cells[g] else float("nan")
    return out
