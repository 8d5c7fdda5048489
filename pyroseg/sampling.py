"""Draw masks for images on disk: ``pyroseg sample``.

For each input image the output folder gets::

    <name>_sample_001.png ...   every sampled mask (0 / 255)
    <name>_mean.png             the per-pixel mean probability (0..255)
    <name>_uncertainty.png      the per-pixel standard deviation of the sampled
                                probabilities, scaled so 0.5 (the maximum) is 255
    <name>_grid.png             image, ground truth when known, samples, mean and
                                uncertainty with colour bars, for a person to read
    <name>_samples.npz          ``probs`` (S, H, W) float16, ``mean`` and ``std`` (H, W)

Inputs are RGB images in any format Pillow reads (the LGG ``.tif`` among them),
resized to the run's training size by area averaging, or NIfTI files
(``.nii`` / ``.nii.gz``, e.g. a QUBIQ ``case/image.nii.gz``), read and scaled as
the QUBIQ reader reads them (:func:`sample_nifti`): besides the PNGs, the
samples, mean and std go back into NIfTI files on the input's grid, with its
affine and header::

    <name>_samples.nii.gz       the thresholded samples (0/1), stacked on a new last axis
    <name>_mean.nii.gz          the mean probability (float32)
    <name>_std.nii.gz           the std of the sampled probabilities (float32)

A 3-D volume is sliced along the run's ``slice_axis``, each slice sampled,
and the results written back as volumes; its PNG is one grid of a few slices. A folder is read
non-recursively; ``*_mask.*`` files in it are taken as the ground truth of the
image of the same name, not as inputs.

:func:`sample_split` does the same for slices of the run's own data set (its
test patients, say), with every annotator's mask as the ground truth: the way
to look at a model trained on the built-in synthetic data. Its files are named
``<patient>_<slice>_...``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pyroseg.checkpoint import atomic_write, atomic_write_bytes
from pyroseg.data.lgg import read_image, read_mask
from pyroseg.data.resize import resize_image, resize_mask
from pyroseg.devices import resolve_device
from pyroseg.errors import DataError, UsageError
from pyroseg.runs import at_least_one, check_split, load_run
from pyroseg.tta import TestTimeAugmentation

__all__ = ["balanced_draws", "find_inputs", "sample_images", "sample_split", "sample_nifti", "pick_slices", "IMAGE_SUFFIXES", "is_nifti"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz")


def is_nifti(p: Path) -> bool:
    return p.name.lower().endswith((".nii", ".nii.gz"))


def _suffix_ok(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES or is_nifti(p)


def _stem(p: Path) -> str:
    """The name without its suffix (``image.nii.gz`` -> ``image``)."""
    return p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem


def _is_mask_name(p: Path) -> bool:
    return p.stem.endswith("_mask")


def find_inputs(path: str | Path) -> list[tuple[Path, Path | None]]:
    """``(image, mask or None)`` pairs for an image file or a folder of images."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--input {path}: does not exist")
    if path.is_file():
        if not _suffix_ok(path):
            raise UsageError(f"--input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)})")
        mask = path.with_name(path.stem + "_mask" + path.suffix)
        return [(path, mask if mask.is_file() else None)]
    files = sorted(p for p in path.iterdir() if p.is_file() and _suffix_ok(p))
    images = [p for p in files if not _is_mask_name(p)]
    if not images:
        raise UsageError(f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")

    def slice_key(p: Path):
        head, _, tail = p.stem.rpartition("_")
        return (head, int(tail)) if tail.isdigit() else (p.stem, -1)

    images.sort(key=slice_key)
    out = []
    for p in images:
        mask = p.with_name(p.stem + "_mask" + p.suffix)
        out.append((p, mask if mask.is_file() else None))
    return out


def _out_dir(out: str | Path) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create ({e.strerror or e})") from None
    return out


def balanced_draws(model, num_samples: int) -> int:
    """The number of samples to draw so that the mean weighs a mixture's parts alike:
    the least multiple of ``model.num_draws(num_samples)`` that is at least ``num_samples``.
    ``num_samples`` for most models; 20 for 16 asked of an ensemble of 5 (4 per member) or of
    test-time augmentation over one (every member under every flip)."""
    n = model.num_draws(num_samples)
    return n * math.ceil(num_samples / n)


def _balanced(model, num_samples: int) -> int:
    n = balanced_draws(model, num_samples)
    if n != num_samples:
        log.info("drawing %d samples instead of %d, so that %s's parts weigh alike", n, num_samples, model.name)
    return n


def _sample_one(run, image: torch.Tensor, truth: np.ndarray | None, stem: str, out: Path, *, num_samples: int,
                grid_samples: int) -> dict:
    """Sample one image ``(1, C, S, S)`` and write its files; ``truth``: ``(A, S, S)`` 0/1 or None.
    The record's ``row`` is the image's row of a :func:`~pyroseg.plots.sample_grid`."""
    from pyroseg import plots  # matplotlib only when pictures are drawn
    from pyroseg.metrics import dice, ged, hm_iou

    probs = run.model.sample(image, num_samples)[:, 0, 0].float().cpu().numpy()  # (S, H, W)
    mean, std = probs.mean(0), probs.std(0)
    written = []
    for s in range(num_samples):
        p = out / f"{stem}_sample_{s + 1:03d}.png"
        _png(p, (probs[s] >= 0.5) * 255)
        written.append(p)
    _png(out / f"{stem}_mean.png", np.round(mean * 255))
    _png(out / f"{stem}_uncertainty.png", np.round(np.clip(std / 0.5, 0, 1) * 255))
    atomic_write(out / f"{stem}_samples.npz", lambda f: np.savez_compressed(f, probs=probs.astype(np.float16), mean=mean, std=std))
    rec = {"files": [], "num_samples": num_samples}
    note = None
    if truth is not None:
        t = torch.from_numpy(np.asarray(truth, dtype=np.uint8))  # (A, H, W)
        binary = torch.from_numpy(probs >= 0.5)  # (S, H, W)
        rec["dice_mean"] = float(dice(torch.from_numpy(mean[None] >= 0.5), t[:1])[0])
        rec["ged"] = float(ged(binary[None], t[None])[0])
        rec["hm_iou"] = float(hm_iou(binary[None], t[None])[0])
        note = f"GED {rec['ged']:.2f}, HM-IoU {rec['hm_iou']:.2f}"
    row = {"image": image[0].cpu().numpy(), "samples": probs, "truth": truth, "name": stem, "note": note}
    plots.sample_grid(
        [row],
        out / f"{stem}_grid.png",
        max_samples=grid_samples,
        title=f"{run.model.name}: {num_samples} samples (z from {run.model.sample_from})",
    )
    written += [out / f"{stem}_{x}" for x in ("mean.png", "uncertainty.png", "samples.npz", "grid.png")]
    rec["files"] = [str(p) for p in written]
    rec["row"] = row
    return rec


def pick_slices(masks: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` slices to show, lesion slices first.

    ``masks``: ``(N, A, H, W)``. Slices that any annotator marks, evenly
    spaced over them (so several patients and lesion sizes show), then
    slices without a lesion, in order. Returns sorted ``(k,)`` indices.
    """
    marked = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, dtype=bool)
    lesion, empty = np.flatnonzero(marked), np.flatnonzero(~marked)
    take = lesion[np.unique(np.linspace(0, len(lesion) - 1, min(n, len(lesion))).round().astype(int))] if len(lesion) and n else lesion[:0]
    rest = empty[: max(0, n - len(take))]
    return np.sort(np.concatenate([take, rest]))


def _png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` array as a grayscale PNG, atomically."""
    img = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))  # 2-D uint8 -> mode L
    atomic_write(path, lambda f: img.save(f, format="PNG"))


@torch.inference_mode()
def sample_images(
    run_dir: str | Path,
    inputs: str | Path,
    out: str | Path,
    *,
    num_samples: int = 16,
    tta: bool = False,
    device: str = "auto",
    grid_samples: int = 6,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: str | None = None,
) -> list[dict]:
    """Sample ``num_samples`` masks for every input image; returns one record per
    image (input, files written, the weights used (``checkpoint``: best.pt by default,
    see :func:`pyroseg.runs.pick_checkpoint`) and the mean Dice against the truth when known)."""
    at_least_one("--num-samples", num_samples)
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev, checkpoint=checkpoint)
    log.info("sampling from %s", run.checkpoint_used)
    if tta:
        run.model = TestTimeAugmentation(run.model)
    num_samples = _balanced(run.model, num_samples)
    size = run.config.image_size
    pairs = find_inputs(inputs)
    out = _out_dir(out)
    records = []
    for k, (img_path, mask_path) in enumerate(pairs):
        if is_nifti(img_path):
            rec = sample_nifti(run, img_path, out, num_samples=num_samples, grid_samples=grid_samples, device=dev)
            rec["checkpoint"] = run.checkpoint_used
            records.append(rec)
            if progress:
                progress(k + 1, len(pairs))
            continue
        rgb = read_image(img_path)  # (H, W, 3) uint8, validated
        image = torch.from_numpy(resize_image(rgb, size)).float().div(255).unsqueeze(0).to(dev)  # (1, 3, S, S)
        truth = None
        if mask_path is not None:
            try:
                truth = resize_mask(read_mask(mask_path, rgb.shape[:2]), size)[None]  # (1, S, S)
            except DataError as e:
                log.warning("ignoring ground truth: %s", e)
        rec = _sample_one(run, image, truth, img_path.stem, out, num_samples=num_samples, grid_samples=grid_samples)
        rec["input"] = str(img_path)
        rec["checkpoint"] = run.checkpoint_used
        del rec["row"]
        records.append(rec)
        if progress:
            progress(k + 1, len(pairs))
    return records


@torch.inference_mode()
def sample_split(
    run_dir: str | Path,
    split: str,
    out: str | Path,
    *,
    num_images: int = 4,
    num_samples: int = 16,
    tta: bool = False,
    device: str = "auto",
    grid_samples: int = 6,
    cache_dir: str | None = None,
    checkpoint: str | None = None,
) -> list[dict]:
    """Sample ``num_samples`` masks for ``num_images`` slices of the run's own data,
    from the patients of ``split`` (``test``, ``val``, ``train`` or ``all``), chosen
    by :func:`pick_slices`; every annotator's mask is the ground truth of the
    grid, and ``<split>_grid.png`` shows all the slices in one picture, a row
    each. Returns one record per slice (as :func:`sample_images`, plus the
    slice's GED and matched IoU against its annotators)."""
    from pyroseg import plots

    at_least_one("--num-samples", num_samples)
    at_least_one("--num-images", num_images)
    check_split(split)
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev, checkpoint=checkpoint)
    log.info("sampling from %s", run.checkpoint_used)
    if tta:
        run.model = TestTimeAugmentation(run.model)
    num_samples = _balanced(run.model, num_samples)
    cfg = run.config
    data = run.load_data(split, cache_dir=cache_dir)
    out = _out_dir(out)
    records = []
    for i in pick_slices(data.masks, num_images):
        image = torch.from_numpy(data.images[i : i + 1]).float().div(255).to(dev)  # (1, C, H, W)
        stem = f"{data.patients[i]}_{data.slice_numbers[i]}"
        rec = _sample_one(run, image, data.masks[i, : data.rater_counts[i]], stem, out, num_samples=num_samples, grid_samples=grid_samples)
        rec["input"] = f"{cfg.data} [{split}] {data.patients[i]} slice {data.slice_numbers[i]}"
        rec["checkpoint"] = run.checkpoint_used
        records.append(rec)
    rows = [r.pop("row") for r in records]
    overview = plots.sample_grid(rows, out / f"{split}_grid.png", max_samples=grid_samples,
                                 title=f"{run.model.name} on {cfg.data} [{split}]: {num_samples} samples per slice "
                                       f"(z from {run.model.sample_from})")
    records[-1]["files"].append(str(overview))
    return records


def _nifti_items(arr: np.ndarray, in_channels: int, slice_axis: int, source: Path) -> tuple[np.ndarray, int | None]:
    """``arr`` as a stack of 2-D items ``(D, H, W, C)`` and the axis it was sliced along (None: 2-D)."""
    if arr.ndim == 2 or (arr.ndim == 3 and in_channels > 1 and arr.shape[-1] == in_channels):
        return (arr[None, :, :, None] if arr.ndim == 2 else arr[None]), None
    if arr.ndim in (3, 4):
        if arr.ndim == 4 and arr.shape[-1] != in_channels:
            raise UsageError(f"--input {source}: {arr.shape[-1]} channels, but the run was trained on {in_channels}")
        ax = slice_axis % 3
        vol = np.moveaxis(arr, ax, 0)  # (D, H, W[, C])
        return (vol if vol.ndim == 4 else vol[..., None]), ax
    raise UsageError(f"--input {source} is {arr.ndim}-D: expected a 2-D image or a 3-D volume")


def _back_to_grid(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``probs`` ``(S, s, s)`` on the training grid back to ``shape`` ``(H, W)``: bilinear upsampling
    to the padded square, then the padding of :func:`~pyroseg.data.raters.pad_square` cropped."""
    import torch.nn.functional as F

    h, w = shape
    m = max(h, w)
    up = F.interpolate(torch.from_numpy(probs)[:, None].float(), size=(m, m), mode="bilinear", align_corners=False)[:, 0]
    top, left = (m - h) // 2, (m - w) // 2
    return up[:, top : top + h, left : left + w].clamp_(0, 1).numpy()


@torch.inference_mode()
def sample_nifti(run, path: Path, out: Path, *, num_samples: int, grid_samples: int = 6, device="cpu") -> dict:
    """Sample a NIfTI image or volume with the loaded ``run``; write NIfTI files and PNGs (module docs).

    ``path``: ``(H, W)``, ``(H, W, C)`` with ``C`` the run's channels, ``(X, Y, Z)`` or ``(X, Y, Z, C)``
    (size-1 axes after the first two dropped). Intensities as the QUBIQ reader scales them; a
    volume is sliced along the run's ``slice_axis``. Returns the record of :func:`sample_images`.
    """
    import gzip

    import nibabel as nib

    from pyroseg import plots
    from pyroseg.data.qubiq import read_nifti
    from pyroseg.data.raters import pad_square, scale_intensity

    arr, img = read_nifti(path)
    size, c = run.config.image_size, run.model.in_channels
    items, axis = _nifti_items(arr, c, run.config.slice_axis, path)  # (D, H, W, C)
    if items.shape[-1] != c:
        raise UsageError(f"--input {path}: {items.shape[-1]} channel(s), but the run was trained on {c}")
    scaled, _ = scale_intensity(items)  # per channel over the whole image / volume, as the reader does
    stem = _stem(path)
    probs = np.empty((num_samples, *items.shape[:3]), np.float32)  # (S, D, H, W)
    images = torch.from_numpy(np.stack([resize_image(pad_square(x), size) for x in scaled])).float().div(255)  # (D, C, s, s)
    rows = []
    if axis is None:  # one 2-D image: the usual PNGs, and its samples for the NIfTI files
        rec = _sample_one(run, images.to(device), None, stem, out, num_samples=num_samples, grid_samples=grid_samples)
        probs[:, 0] = _back_to_grid(rec.pop("row")["samples"], items.shape[1:3])
    else:
        for i in range(0, len(images), 64):  # the slices of a volume in batches
            p = run.model.sample(images[i : i + 64].to(device), num_samples)[:, :, 0].float().cpu().numpy()  # (S, b, s, s)
            for j in range(p.shape[1]):
                probs[:, i + j] = _back_to_grid(p[:, j], items.shape[1:3])
                rows.append({"image": images[i + j].numpy(), "samples": p[:, j], "truth": None, "name": f"{stem} #{i + j}"})
    if axis is None:
        probs_grid = probs[:, 0]  # (S, H, W)
    else:
        probs_grid = np.moveaxis(probs, 1, 1 + axis)  # (S, X, Y, Z)
        rec = {"files": [], "num_samples": num_samples}
        show = pick_slices((np.mean(probs, 0) >= 0.5)[:, None], min(6, len(items)))
        grid = plots.sample_grid([rows[i] for i in show], out / f"{stem}_grid.png", max_samples=grid_samples,
                                 title=f"{run.model.name}: {num_samples} samples, slices {', '.join(map(str, show))} of {path.name}")
        rec["files"].append(str(grid))
    grid_shape = tuple(arr.shape[:3] if axis is not None else arr.shape[:2])
    probs_grid = probs_grid.reshape(num_samples, *grid_shape)

    def save(name: str, data: np.ndarray, dtype) -> None:
        header = img.header.copy()
        header.set_data_dtype(dtype)
        nifti = nib.Nifti1Image(np.asarray(data, dtype=dtype), img.affine, header=header)
        target = out / f"{stem}_{name}.nii.gz"
        atomic_write_bytes(target, gzip.compress(nifti.to_bytes(), mtime=0))
        rec["files"].append(str(target))

    save("samples", np.moveaxis(probs_grid >= 0.5, 0, -1), np.uint8)
    save("mean", probs_grid.mean(0), np.float32)
    save("std", probs_grid.std(0), np.float32)
    rec["input"] = str(path)
    return rec
