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
resized to the run's training size by area averaging. A folder is read
non-recursively; ``*_mask.*`` files in it are taken as the ground truth of the
image of the same name, not as inputs.

:func:`sample_split` does the same for slices of the run's own data set (its
test patients, say), with every annotator's mask as the ground truth: the way
to look at a model trained on the built-in synthetic data. Its files are named
``<patient>_<slice>_...``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pyroseg.checkpoint import atomic_write
from pyroseg.data.lgg import read_image, read_mask
from pyroseg.data.resize import resize_image, resize_mask
from pyroseg.devices import resolve_device
from pyroseg.errors import DataError, UsageError
from pyroseg.runs import load_run

__all__ = ["find_inputs", "sample_images", "sample_split", "pick_slices", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


def _is_mask_name(p: Path) -> bool:
    return p.stem.endswith("_mask")


def find_inputs(path: str | Path) -> list[tuple[Path, Path | None]]:
    """``(image, mask or None)`` pairs for an image file or a folder of images."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--input {path}: does not exist")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"--input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)})")
        mask = path.with_name(path.stem + "_mask" + path.suffix)
        return [(path, mask if mask.is_file() else None)]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
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
    device: str = "auto",
    grid_samples: int = 6,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Sample ``num_samples`` masks for every input image; returns one record per
    image (input, files written, and the mean Dice against the truth when known)."""
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected at least 1")
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    size = run.config.image_size
    pairs = find_inputs(inputs)
    out = _out_dir(out)
    records = []
    for k, (img_path, mask_path) in enumerate(pairs):
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
    device: str = "auto",
    grid_samples: int = 6,
    cache_dir: str | None = None,
) -> list[dict]:
    """Sample ``num_samples`` masks for ``num_images`` slices of the run's own data,
    from the patients of ``split`` (``test``, ``val``, ``train`` or ``all``), chosen
    by :func:`pick_slices`; every annotator's mask is the ground truth of the
    grid, and ``<split>_grid.png`` shows all the slices in one picture, a row
    each. Returns one record per slice (as :func:`sample_images`, plus the
    slice's GED and matched IoU against its annotators)."""
    from pyroseg import plots
    from pyroseg.data import load_source
    from pyroseg.runs import EVAL_SPLITS, select_split

    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected at least 1")
    if num_images < 1:
        raise UsageError(f"--num-images {num_images}: expected at least 1")
    if split not in EVAL_SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    cfg = run.config
    data = load_source(cfg.data, cfg.image_size, seed=cfg.seed, synthetic_patients=cfg.synthetic_patients,
                       synthetic_slices=cfg.synthetic_slices, cache_dir=cache_dir or cfg.cache_dir)
    data = select_split(data, run.split, split, source=cfg.data)
    out = _out_dir(out)
    records = []
    for i in pick_slices(data.masks, num_images):
        image = torch.from_numpy(data.images[i : i + 1]).float().div(255).to(dev)  # (1, C, H, W)
        stem = f"{data.patients[i]}_{data.slice_numbers[i]}"
        rec = _sample_one(run, image, data.masks[i], stem, out, num_samples=num_samples, grid_samples=grid_samples)
        rec["input"] = f"{cfg.data} [{split}] {data.patients[i]} slice {data.slice_numbers[i]}"
        records.append(rec)
    rows = [r.pop("row") for r in records]
    overview = plots.sample_grid(rows, out / f"{split}_grid.png", max_samples=grid_samples,
                                 title=f"{run.model.name} on {cfg.data} [{split}]: {num_samples} samples per slice "
                                       f"(z from {run.model.sample_from})")
    records[-1]["files"].append(str(overview))
    return records
