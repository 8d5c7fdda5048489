"""Area-averaging resize of images and majority-vote resize of masks.

Both functions resize a *square* array to ``size x size``:

* when the original side is an integer multiple of ``size`` (256 -> 128, 128 -> 64,
  ...) they take plain block means in numpy, which is exactly area averaging;
* otherwise (a non-integer factor, or upsampling) they use Pillow's ``Image.BOX``
  filter on a 32-bit float ("F" mode) copy of each channel, which is area
  averaging with fractional pixel weights.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["resize_image", "resize_mask"]

#: Slack when comparing a PIL-resized float mask fraction with 0.5: the box
#: weights are float32, so an exact tie can come out as 0.49999997.
_TIE_TOLERANCE = 1e-6


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")


def _check_square(shape: tuple[int, ...], what: str) -> int:
    h, w = shape[:2]
    if h != w or h < 1:
        raise ValueError(f"{what} must be square and non-empty, got {h}x{w}")
    return h


def _block_factor(side: int, size: int) -> int | None:
    """The integer downsampling factor ``side // size``, or None when there is none."""
    if side >= size and side % size == 0:
        return side // size
    return None


def _block_sums(x: np.ndarray, f: int) -> np.ndarray:
    """Sums of the ``f x f`` blocks of ``x`` ``(H, W, ...)``: ``uint32`` ``(H/f, W/f, ...)``.

    Adds the ``f`` rows then the ``f`` columns of each block as whole-array slices,
    several times faster than ``sum(axis=...)`` on the strided view. Exact while
    ``f * f * max(x) < 2**32``.
    """
    h, w = x.shape[:2]
    v = x.reshape(h // f, f, w // f, f, *x.shape[2:])
    rows = v[:, 0].astype(np.uint32)  # (H/f, W/f, f, ...)
    for k in range(1, f):
        rows += v[:, k]
    out = rows[:, :, 0].copy()  # (H/f, W/f, ...)
    for k in range(1, f):
        out += rows[:, :, k]
    return out


def _box_plane(plane: np.ndarray, size: int) -> np.ndarray:
    """Area-average one ``(H, W)`` plane to ``(size, size)`` float32 with PIL ``BOX``."""
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """Round half up and clip to ``uint8``."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a square multi-channel image by area averaging.

    :param img: ``uint8`` array ``(H, W, C)`` with ``H == W`` (channels last, as
        Pillow decodes it).
    :param size: the output side ``S``.
    :returns: ``uint8`` array ``(C, S, S)`` (channels first), each value the mean
        of the input pixels its output pixel covers, rounded half up. For an
        integer factor ``f = H / S`` this is exactly the mean of each ``f x f``
        block; for ``S == H`` the pixels are unchanged.
    :raises ValueError: when ``img`` is not ``(H, W, C)``, not square, or ``size < 1``.
    """
    _check_size(size)
    if img.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {img.shape}")
    side = _check_square(img.shape, "image")
    if side == size:
        return np.ascontiguousarray(np.moveaxis(img, -1, 0), dtype=np.uint8)
    f = _block_factor(side, size)
    if f is not None:
        sums = _block_sums(img, f)  # (S, S, C)
        n = f * f
        mean = (2 * sums + n) // (2 * n)  # exact integer mean, rounded half up
        return np.ascontiguousarray(np.moveaxis(mean, -1, 0), dtype=np.uint8)
    return np.stack([_round_uint8(_box_plane(img[:, :, c], size)) for c in range(img.shape[2])])


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a square 0/1 mask by majority vote.

    Each output pixel is the area average of the input mask over the region it
    covers, thresholded at ``>= 0.5``: **a tie (exactly half the area lesion)
    counts as lesion**, so downsampling never erases a lesion that fills half of
    a block. For an integer factor the vote is counted exactly in integers.

    :param mask: array ``(H, W)`` with ``H == W``, ``bool`` or integer 0/1.
    :param size: the output side ``S``.
    :returns: ``uint8`` array ``(S, S)`` of 0/1; the input unchanged (as ``uint8``)
        when ``S == H``.
    :raises ValueError: when ``mask`` is not ``(H, W)``, not square, holds values
        other than 0 and 1, or ``size < 1``.
    """
    _check_size(size)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    side = _check_square(mask.shape, "mask")
    m = mask.astype(np.uint8, copy=False)
    if m.size and m.max() > 1:
        raise ValueError(f"mask must hold only 0 and 1, found a maximum of {int(m.max())}")
    if side == size:
        return np.ascontiguousarray(m, dtype=np.uint8).copy()
    f = _block_factor(side, size)
    if f is not None:
        votes = _block_sums(m, f)
        return (2 * votes >= f * f).astype(np.uint8)
    frac = _box_plane(m, size)
    return (frac >= 0.5 - _TIE_TOLERANCE).astype(np.uint8)
