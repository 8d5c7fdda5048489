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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from pyroseg.checkpoint import atomic_write
from pyroseg.data.lgg import read_image, read_mask
from pyroseg.data.resize import resize_image, resize_mask
from pyroseg.errors import DataError, UsageError
from pyroseg.runs import load_run
from pyroseg.train import resolve_device

__all__ = ["find_inputs", "sample_images", "IMAGE_SUFFIXES"]

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
    from pyroseg import plots  # matplotlib only when pictures are drawn

    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    size = run.config.image_size
    pairs = find_inputs(inputs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create ({e.strerror or e})") from None
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
        probs = run.model.sample(image, num_samples)[:, 0, 0].float().cpu().numpy()  # (S, S_img, S_img)
        mean, std = probs.mean(0), probs.std(0)
        stem = img_path.stem
        written = []
        for s in range(num_samples):
            p = out / f"{stem}_sample_{s + 1:03d}.png"
            _png(p, (probs[s] >= 0.5) * 255)
            written.append(p)
        _png(out / f"{stem}_mean.png", np.round(mean * 255))
        _png(out / f"{stem}_uncertainty.png", np.round(np.clip(std / 0.5, 0, 1) * 255))
        atomic_write(out / f"{stem}_samples.npz", lambda f: np.savez_compressed(f, probs=probs.astype(np.float16), mean=mean, std=std))
        plots.sample_grid(
            [{"image": image[0].cpu().numpy(), "samples": probs, "truth": truth, "name": stem}],
            out / f"{stem}_grid.png",
            max_samples=grid_samples,
            title=f"{run.model.name}: {num_samples} samples (z from {run.model.sample_from})",
        )
        written += [out / f"{stem}_{x}" for x in ("mean.png", "uncertainty.png", "samples.npz", "grid.png")]
        rec = {"input": str(img_path), "files": [str(p) for p in written], "num_samples": num_samples}
        if truth is not None:
            from pyroseg.metrics import dice

            rec["dice_mean"] = float(dice(torch.from_numpy(mean[None] >= 0.5), torch.from_numpy(truth))[0])
        records.append(rec)
        if progress:
            progress(k + 1, len(pairs))
    return records
