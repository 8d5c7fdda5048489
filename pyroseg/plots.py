"""Pictures: training curves, sample grids with uncertainty, reliability diagrams, a comparison's figure.

matplotlib with the Agg backend (no screen needed); every function writes one
PNG and returns its path.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pyroseg.checkpoint import atomic_write  # noqa: E402
from pyroseg.latents import predict_probs  # noqa: E402
from pyroseg.runs import read_metrics_csv  # noqa: E402

__all__ = [
    "plot_curves",
    "sample_grid",
    "validation_grid",
    "latent_scales_grid",
    "uncertainty",
    "reliability_diagram",
    "comparison_figure",
]


def uncertainty(samples: np.ndarray) -> np.ndarray:
    """Per-pixel uncertainty: the standard deviation over samples of the mask
    probability, ``(S, H, W) -> (H, W)``, in [0, 0.5]. 0 where every sample agrees."""
    return samples.std(axis=0)


def plot_curves(metrics_csv: str | Path, png: str | Path) -> Path:
    """Loss, reconstruction, KL per latent site, beta and validation Dice against epoch."""
    rows = read_metrics_csv(metrics_csv)
    png = Path(png)
    if not rows:
        raise ValueError(f"{metrics_csv}: no rows to plot")
    ep = [r["epoch"] for r in rows]
    kl_cols = [k for k in rows[0] if k.startswith("val_kl_")]
    panels = [
        ("loss (nats / image)", [("train_loss", "train (at current beta)"), ("val_loss", "val -ELBO (beta=1)")]),
        ("reconstruction (nats / image)", [("val_recon", "val -log p(y|x,z)")]),
    ]
    if kl_cols:
        panels.append(("KL per latent site (nats / image)", [(k, k[len("val_kl_"):]) for k in kl_cols]))
    panels.append(("beta", [("beta", "beta")]))
    panels.append(("validation Dice", [("val_dice_all", "dice_all"), ("val_dice_tumour", "dice_tumour")]))
    au_cols = [k for k in rows[0] if k.startswith("val_au_")]
    if au_cols:
        panels.append(("active units per latent site (val)", [(k, k[len("val_au_"):]) for k in au_cols]))
    extra = [k for k in ("geco_lambda",) if k in rows[0]]
    for k in extra:
        panels.append(("GECO lambda (1 = ELBO)", [(k, k)]))
    n = len(panels)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for key, label in series:
            if key in rows[0]:
                ax.plot(ep, [r.get(key, float("nan")) for r in rows], marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if title.startswith("KL"):
            ax.set_yscale("symlog", linthresh=0.1)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110))  # a kill never leaves half a PNG
    plt.close(fig)
    return png


def sample_grid(
    rows: Sequence[dict],
    png: str | Path,
    *,
    max_samples: int = 6,
    title: str | None = None,
) -> Path:
    """One row per image: image (FLAIR), ground truth(s) if known, samples, mean, uncertainty.

    Each row dict has ``image: (C, H, W)`` float in [0, 1], ``samples: (S, H, W)``
    mask probabilities, optionally ``truth: (A, H, W)`` binary (A annotators),
    ``name`` and ``note`` (a second line under the name, e.g. the row's GED).
    Samples are shown thresholded at 0.5; the mean probability
    and the per-pixel standard deviation get colour bars.
    """
    png = Path(png)
    n_truth = max((len(r["truth"]) if r.get("truth") is not None else 0) for r in rows)
    n_show = min(max_samples, max(len(r["samples"]) for r in rows))
    ncols = 1 + n_truth + n_show + 2
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.55 * ncols + 0.8, 1.6 * len(rows) + 0.4), squeeze=False)
    for i, r in enumerate(rows):
        img = np.asarray(r["image"])
        flair = img[1] if img.shape[0] >= 2 else img[0]
        samples = np.asarray(r["samples"])
        col = 0
        ax = axes[i, col]
        ax.imshow(flair, cmap="gray", vmin=0, vmax=1)
        label = str(r.get("name", i))[-18:] + (f"\n{r['note']}" if r.get("note") else "")
        ax.set_ylabel(label, fontsize=7)
        if i == 0:
            ax.set_title("image (FLAIR)" if img.shape[0] == 3 else "image", fontsize=8)
        col += 1
        truths = r.get("truth")
        for a in range(n_truth):
            ax = axes[i, col]
            if truths is not None and a < len(truths):
                ax.imshow(flair, cmap="gray", vmin=0, vmax=1)
                ax.imshow(np.ma.masked_equal(np.asarray(truths[a]), 0), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
            if i == 0:
                ax.set_title("truth" if n_truth == 1 else f"annotator {a + 1}", fontsize=8)
            col += 1
        for s in range(n_show):
            ax = axes[i, col]
            if s < len(samples):
                ax.imshow(flair, cmap="gray", vmin=0, vmax=1)
                ax.imshow(np.ma.masked_equal((samples[s] >= 0.5).astype(float), 0), cmap="cool", alpha=0.6, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(f"sample {s + 1}", fontsize=8)
            col += 1
        ax = axes[i, col]
        im = ax.imshow(samples.mean(0), cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        if i == 0:
            ax.set_title("mean prob.", fontsize=8)
        col += 1
        ax = axes[i, col]
        im = ax.imshow(uncertainty(samples), cmap="magma", vmin=0, vmax=0.5)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        if i == 0:
            ax.set_title("uncertainty (std)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=110))  # a kill never leaves half a PNG
    plt.close(fig)
    return png


def reliability_diagram(curves: dict[str, dict], png: str | Path, *, title: str | None = None) -> Path:
    """Observed lesion frequency against predicted probability, one line per curve.

    ``curves``: ``{label: curve}`` with each curve as from
    :func:`pyroseg.metrics.reliability_curve` (``edges``, ``count``,
    ``confidence``, ``frequency``). Top: frequency against mean confidence per
    bin (a calibrated model lies on the diagonal); bottom: pixels per bin (log
    scale), since a few bins usually hold almost every pixel.
    """
    png = Path(png)
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.6, 5.4), gridspec_kw={"height_ratios": [3, 1.2]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    markers = "osD^v<>"
    for k, (label, c) in enumerate(curves.items()):
        conf = np.asarray(c["confidence"], dtype=float)
        freq = np.asarray(c["frequency"], dtype=float)
        ok = np.isfinite(conf) & np.isfinite(freq)
        line = ax.plot(conf[ok], freq[ok], marker=markers[k % len(markers)], ms=4, lw=1.4, label=label)[0]
        edges = np.asarray(c["edges"], dtype=float)
        centres = (edges[:-1] + edges[1:]) / 2
        width = (edges[1:] - edges[:-1]) / (len(curves) + 0.5)
        offset = (k - (len(curves) - 1) / 2) * width
        count = np.asarray(c["count"], dtype=float)
        filled = count > 0  # an empty bin has no bar (log scale)
        axc.bar((centres + offset)[filled], count[filled], width=width[filled], color=line.get_color(), alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed lesion frequency\n(fraction of annotators)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 60, break_on_hyphens=False)), fontsize=8)
    axc.set_yscale("log")
    axc.set_ylabel("pixels", fontsize=8)
    axc.set_xlabel("predicted lesion probability (bin)", fontsize=8)
    axc.grid(alpha=0.3, axis="y")
    for a in (ax, axc):
        a.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


@torch.inference_mode()
def validation_grid(model, data, png: str | Path, *, device="cpu", n_images: int = 6, num_samples: int = 16, seed: int = 0) -> Path:
    """A :func:`sample_grid` of up to ``n_images`` validation slices, lesion slices first."""
    has = data.masks[:, 0].reshape(len(data), -1).any(1)
    order = np.concatenate([np.flatnonzero(has), np.flatnonzero(~has)])
    rng = np.random.default_rng(seed)
    lesion = np.flatnonzero(has)
    pick = list(rng.choice(lesion, size=min(len(lesion), n_images - 1), replace=False)) if len(lesion) else []
    pick += [i for i in order if i not in pick][: n_images - len(pick)]
    was = model.training
    model.eval()
    images = torch.from_numpy(data.images[pick]).float().div(255).to(device)
    probs = model.sample(images, model.num_draws(num_samples)).cpu().numpy()  # (S, B, 1, H, W)
    model.train(was)
    from pyroseg.metrics import ged, hm_iou

    binary = torch.from_numpy(probs[:, :, 0] >= 0.5).transpose(0, 1)  # (B, S, H, W)
    truths = torch.from_numpy(data.masks[pick])  # (B, A, H, W)
    counts = torch.from_numpy(data.rater_counts[pick])  # each slice against its own raters only
    g, m = ged(binary, truths, counts=counts).tolist(), hm_iou(binary, truths, counts=counts).tolist()
    rows = [
        {
            "image": images[j].cpu().numpy(),
            "samples": probs[:, j, 0],
            "truth": data.masks[i, : data.rater_counts[i]],
            "name": f"{data.patients[i]} #{data.slice_numbers[i]}",
            "note": f"GED {g[j]:.2f}, HM-IoU {m[j]:.2f}",
        }
        for j, i in enumerate(pick)
    ]
    return sample_grid(rows, png, title=f"{model.name}: validation samples (z from {model.sample_from})")


@torch.inference_mode()
def latent_scales_grid(model, data, png: str | Path, *, device="cpu", n_images: int = 3, num_samples: int = 6, seed: int = 0) -> Path:
    """What each latent site controls: for each of ``n_images`` validation slices
    (lesion slices first), one row of samples with every site drawn, then one
    row per site with only that site drawn and every other site fixed to the
    mean of its test-time distribution (the prior net's for the Probabilistic
    U-Nets, as in the HPU-Net paper's figures; ``q(z|x)``'s for the VAE family).
    A row whose samples all look alike belongs to a site that controls nothing.
    """
    png = Path(png)
    has = data.masks[:, 0].reshape(len(data), -1).any(1)
    rng = np.random.default_rng(seed)
    lesion = np.flatnonzero(has)
    pick = list(rng.choice(lesion, size=min(len(lesion), n_images), replace=False)) if len(lesion) else []
    pick += [i for i in range(len(data)) if i not in pick][: n_images - len(pick)]
    sites = list(model.latent_sites)
    was = model.training
    model.eval()
    images = torch.from_numpy(data.images[pick]).float().div(255).to(device)
    rows_per_image = [("all sites drawn", predict_probs(model, images, num_samples=num_samples))]
    for s in sites:
        others = [o for o in sites if o != s]
        rows_per_image.append((f"only {s} drawn", predict_probs(model, images, num_samples=num_samples, fix=others)))
    model.train(was)
    nrows = len(pick) * len(rows_per_image)
    ncols = 2 + num_samples + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols + 0.6, 1.35 * nrows + 0.5), squeeze=False)
    for j, i in enumerate(pick):
        img = images[j].cpu().numpy()
        flair = img[1] if img.shape[0] >= 2 else img[0]
        for k, (label, probs) in enumerate(rows_per_image):
            r = j * len(rows_per_image) + k
            p = probs[:, j, 0].cpu().numpy()  # (S, H, W)
            ax = axes[r, 0]
            ax.imshow(flair, cmap="gray", vmin=0, vmax=1)
            ax.set_ylabel(label, fontsize=7)
            ax = axes[r, 1]
            ax.imshow(flair, cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.ma.masked_equal(data.masks[i, 0].astype(float), 0), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
            for s in range(num_samples):
                ax = axes[r, 2 + s]
                ax.imshow(flair, cmap="gray", vmin=0, vmax=1)
                ax.imshow(np.ma.masked_equal((p[s] >= 0.5).astype(float), 0), cmap="cool", alpha=0.6, vmin=0, vmax=1)
            ax = axes[r, -1]
            ax.imshow(uncertainty(p), cmap="magma", vmin=0, vmax=0.5)
            if r == 0:
                for c, t in enumerate(["image", "truth"] + [f"sample {s + 1}" for s in range(num_samples)] + ["std"]):
                    axes[0, c].set_title(t, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{model.name}: what each latent site controls (others at the mean of {model.sample_from})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def comparison_figure(doc: dict, png: str | Path, *, metrics: Sequence[str]) -> Path:
    """A comparison's figure (``comparison.png``): per metric of ``metrics`` that ``doc``
    (a ``comparison.json`` document) summarises, each model's seeds (dots), mean and interval."""
    png = Path(png)
    metrics = [m for m in metrics if any(s["metric"] == m for s in doc["summary"])]
    cols = 4
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        sts = [s for s in doc["summary"] if s["metric"] == metric]
        for i, st in enumerate(sts):
            ax.plot([i] * len(st["values"]), st["values"], ".", color="0.6", ms=4)
            if st["n"] >= 2:
                ax.errorbar([i], [st["mean"]], yerr=[[st["mean"] - st["lo"]], [st["hi"] - st["mean"]]],
                            fmt="o", color="C0", capsize=3)
            else:
                ax.plot([i], [st["mean"]], "o", color="C0")
        ax.set_xticks(range(len(sts)), [s["model"] for s in sts], rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{len(doc['seeds'])} seed(s): dots per seed, mean and {round(doc['level'] * 100)} % t-interval",
                 fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.1, hspace=0.9, wspace=0.3)  # tight_layout: 1/3 of a tiny compare
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return png


def comparison_curves(doc: dict, png: str | Path) -> Path:
    """A comparison's validation curves (``comparison_curves.png``): one panel per model of
    ``doc`` (a ``comparison.json`` document) with every run's (seed, fold) validation score
    against the training step, converged runs solid and the others dashed."""
    png = Path(png)
    runs = [r for r in doc["runs"] if r.get("curve")]
    names = list(dict.fromkeys(r["model"] for r in runs))
    if not names:
        raise ValueError("no run has a validation curve")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        mine = [r for r in runs if r["model"] == name]
        for i, r in enumerate(mine):
            steps, scores = zip(*r["curve"], strict=True)
            label = f"seed {r['seed']}" + (f" fold {r['fold']}" if doc.get("folds", 1) > 1 else "")
            ax.plot(steps, scores, "-" if r.get("converged") else "--", marker=".", ms=3, color=f"C{i % 10}", lw=1, label=label)
        done = sum(bool(r.get("converged")) for r in mine)
        ax.set_title(f"{name}: {done}/{len(mine)} converged", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(mine[0].get("select_by") or "validation score", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(mine) <= 10:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("validation curves (dashed: not converged)", fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.85, bottom=0.15, hspace=0.6, wspace=0.35)
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return png
