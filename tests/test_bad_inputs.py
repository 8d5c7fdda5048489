"""Every bad input we tried, as one table, through the real command line.

Each row: what the user did wrong, the command line, the exit status it must
give (2: a bad option or argument; 1: a failure while running) and the words
the single ``Error: ...`` line must contain (the thing, and what was expected).
For every row the test also checks: no traceback, nothing left uncaught, and
the bytes of every file of an existing run unchanged (``keep``). The table of the
documentation's Troubleshooting page (docs/guide/troubleshooting.md) lists the same
rows by their ``what`` (checked below).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pyroseg.cli.main import cli
from rater_files import lidc_record, write_evil_lidc, write_lidc, write_nifti, write_qubiq
from test_lidc import huge_bytes_pickle, many_raters_pickle, object_array_pickle, segfault_pickle, short_data_pickle

import pyroseg.checkpoint as ck
from pyroseg.config import FitConfig
from pyroseg.errors import CheckpointError
from pyroseg.train import fit

SIZE = 32
TINY = [
    "--image-size", str(SIZE), "--synthetic-patients", "6", "--synthetic-slices", "8", "--epochs", "1",
    "--batch-size", "16", "--widths", "8,16,32,64", "--val-samples", "1", "--device", "cpu", "--quiet",
]  # fmt: skip
P1, P2 = "TCGA_AA_0001_20000101", "TCGA_BB_0002_20000202"
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # chmod does not stop root
TROUBLESHOOTING = Path(__file__).resolve().parents[1] / "docs" / "guide" / "troubleshooting.md"


# --------------------------------------------------------------------------- what the rows build on


def _tiny_run(out: Path, model: str = "unet", image_size: int = SIZE) -> Path:
    cfg = FitConfig(model=model, out=str(out), image_size=image_size, epochs=1, batch_size=16, synthetic_patients=6,
                    synthetic_slices=8, widths=(8, 16, 32, 64), val_samples=1, device="cpu")
    return fit(cfg, pictures=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Three tiny finished runs (1 epoch): unet and prob_unet at 32x32, unet at 64x64."""
    root = tmp_path_factory.mktemp("trained")
    return {
        "unet": _tiny_run(root / "unet"),
        "prob_unet": _tiny_run(root / "prob_unet", "prob_unet"),
        "unet64": _tiny_run(root / "unet64", image_size=64),
    }


@dataclass
class Ctx:
    """What a row's ``build`` gets: a private folder, a private copy of the unet
    run (``run``), the trained runs (read them, do not change them), monkeypatch."""

    tmp: Path
    run: Path
    trained: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch
    cleanup: list = field(default_factory=list)  # run after the command (e.g. undo a chmod)

    def lgg(self, damage: Callable[[Path], None] | None = None) -> Path:
        """A small folder in the kaggle_3m layout (2 patients x 2 slices, 32x32), then ``damage(root)``."""
        root = self.tmp / "kaggle_3m"
        rng = np.random.default_rng(0)
        for p in (P1, P2):
            (root / p).mkdir(parents=True)
            for n in (1, 2):
                _tif(root / p / f"{p}_{n}.tif", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                mask = np.zeros((32, 32), np.uint8)
                mask[8:20, 10:22] = 255
                _tif(root / p / f"{p}_{n}_mask.tif", mask)
        if damage:
            damage(root)
        return root

    def qubiq(self, damage: Callable[[Path], None] | None = None) -> Path:
        """A small QUBIQ task folder (tests/rater_files.py: 5 cases, 16x16, 2-3 raters), then ``damage(root)``."""
        root = write_qubiq(self.tmp / "brain-growth")
        if damage:
            damage(root)
        return root

    def fit_data(self, root: Path) -> list[str]:
        return ["fit", *TINY, "--data", str(root), "--out", str(self.tmp / "out"), "--cache-dir", str(self.tmp / "cache")]

    def image(self) -> Path:
        path = self.tmp / "slice_1.tif"
        _tif(path, np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        return path


def _tif(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)


# --------------------------------------------------------------------------- damage to data, runs, disks


def _unreadable(ctx: Ctx, folder: Path) -> None:
    """Make ``folder`` unlistable: chmod 000, or (as root, whom chmod does not stop) a scandir that says so."""
    if not ROOT_USER:
        folder.chmod(0)
        ctx.cleanup.append(lambda: folder.chmod(0o755))
        return
    import pyroseg.data.lgg as lgg

    real = lgg.os.scandir

    def scandir(path):
        if Path(path) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    ctx.monkeypatch.setattr(lgg.os, "scandir", scandir)


def _disk_full(ctx: Ctx, name: str) -> None:
    """The next atomic write of a file called ``name`` fails with ENOSPC halfway through its bytes."""
    real = ck.atomic_write

    def atomic_write(path, write):
        if Path(path).name != name:
            return real(path, write)

        def half_then_full(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half_then_full)

    ctx.monkeypatch.setattr(ck, "atomic_write", atomic_write)


def _edit_checkpoint(run: Path, **changes) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for key, value in changes.items():
        if isinstance(value, dict):
            state[key] = {**state[key], **value}
        else:
            state[key] = value
    torch.save(state, run / "checkpoint.pt")


def _edit_config(run: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads((run / "config.json").read_text())
    edit(doc)
    (run / "config.json").write_text(json.dumps(doc))


class _RunsCode:
    """Unpickling this would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(ctx: Ctx) -> None:
    state = torch.load(ctx.run / "checkpoint.pt", weights_only=True)
    state["payload"] = _RunsCode(ctx.tmp / "PWNED")
    torch.save(state, ctx.run / "checkpoint.pt")


# the three commands that open a run folder, for the rows about damaged runs
def _resume(ctx: Ctx) -> list[str]:
    return ["fit", "--resume", str(ctx.run), "--epochs", "2", "--quiet"]


# --checkpoint last: the rows below damage checkpoint.pt, and evaluate / sample read best.pt by default
def _evaluate(ctx: Ctx) -> list[str]:
    return ["evaluate", str(ctx.run), "--device", "cpu", "--num-samples", "1", "--checkpoint", "last"]


def _sample(ctx: Ctx) -> list[str]:
    return ["sample", str(ctx.run), "--input", str(ctx.image()), "--out", str(ctx.tmp / "samples"), "--device", "cpu",
            "--checkpoint", "last"]


OPENERS = {"fit --resume": _resume, "evaluate": _evaluate, "sample": _sample}


# --------------------------------------------------------------------------- the table


@dataclass
class Bad:
    what: str  # as in the Troubleshooting table (docs/guide/troubleshooting.md)
    build: Callable[[Ctx], list[str]]  # makes the bad input, returns the command line
    code: int  # the exit status
    names: tuple[str, ...]  # what the Error line must contain; {run}, {tmp} are filled in
    keep: tuple[str, ...] = ("*",)  # files of the run copy whose bytes must not change ("*": all)


def _lgg_case(what, damage, *names):
    return Bad(what, lambda c: c.fit_data(c.lgg(damage)), 1, names)


def _rm(rel):
    return lambda root: (root / rel).unlink()


def _save(rel, array_fn, mode=None):
    return lambda root: _tif(root / rel, array_fn(), mode)


def _truncate(rel, keep_bytes=300):
    def damage(root):
        p = root / rel
        p.write_bytes(p.read_bytes()[:keep_bytes])

    return damage


def _nonbinary(root):
    m = np.zeros((32, 32), np.uint8)
    m[0, :3] = [1, 128, 255]
    _tif(root / P2 / f"{P2}_1_mask.tif", m)


def _rgb(h=32, w=32):
    return lambda: np.full((h, w, 3), 90, np.uint8)


def _qubiq_case(what, damage, *names):
    return Bad(what, lambda c: c.fit_data(c.qubiq(damage)), 1, names)


DATA_CASES = [
    Bad("data folder missing", lambda c: c.fit_data(c.tmp / "nowhere"), 1, ("nowhere", "does not exist")),
    Bad("data path is a file", lambda c: c.fit_data(_touch(c.tmp / "data.csv")), 1, ("data.csv", "not a directory", "expected the kaggle_3m folder")),
    Bad("data folder empty", lambda c: c.fit_data(_mkdir(c.tmp / "empty")), 1, ("no patient folders", "empty", "expected the kaggle_3m folder")),
    Bad("data folder unreadable", lambda c: c.fit_data(_unreadable_lgg(c)), 1, ("cannot list folder", "kaggle_3m", "Permission denied")),
    _lgg_case("patient folder with zero slices", lambda r: _mkdir(r / "TCGA_CC_0003_20000303"), "TCGA_CC_0003_20000303", "no slices", "expected"),
    _lgg_case("image without mask", _rm(f"{P1}/{P1}_2_mask.tif"), f"{P1}_2.tif", "has no mask", f"expected {{tmp}}/kaggle_3m/{P1}/{P1}_2_mask.tif"),
    _lgg_case("mask without image", _rm(f"{P2}/{P2}_1.tif"), f"{P2}_1_mask.tif", "has no image", "expected"),
    _lgg_case("unexpected .tif name", _save(f"{P1}/{P1}_3_seg.tif", _rgb()), f"{P1}_3_seg.tif", f"expected {P1}_<slice>.tif"),
    _lgg_case("mask size differs from its image", _save(f"{P1}/{P1}_1_mask.tif", lambda: np.zeros((16, 16), np.uint8)), f"{P1}_1_mask.tif", "16x16", "32x32"),
    _lgg_case("image not square", _save(f"{P2}/{P2}_2.tif", _rgb(32, 24)), f"{P2}_2.tif", "24x32", "expected a square image"),
    _lgg_case("1-channel image", _save(f"{P1}/{P1}_1.tif", _rgb(), "L"), f"{P1}_1.tif", "mode L", "expected 3-channel RGB"),
    _lgg_case("4-channel image", _save(f"{P1}/{P1}_1.tif", _rgb(), "RGBA"), f"{P1}_1.tif", "mode RGBA", "expected 3-channel RGB"),
    _lgg_case("mask not single-channel", _save(f"{P1}/{P1}_2_mask.tif", _rgb(), "RGB"), f"{P1}_2_mask.tif", "mode RGB", "expected a single-channel mask"),
    _lgg_case("truncated TIFF", _truncate(f"{P2}/{P2}_2.tif"), f"{P2}_2.tif", "unreadable or truncated TIFF"),
    _lgg_case("non-binary mask", _nonbinary, f"{P2}_1_mask.tif", "values 1, 128", "expected only 0 and 255"),
    _qubiq_case("QUBIQ case without image.nii.gz", lambda r: (r / "Training/case02/image.nii.gz").unlink(), "Training/case02", "has no image.nii.gz"),
    _qubiq_case("QUBIQ rater shape differs from its image", lambda r: [write_nifti(r / f"Training/case01/task01_seg0{k}.nii.gz", np.zeros((8, 8), np.uint8)) for k in (1, 2, 3)],
                "case01/image.nii.gz", "16x16", "raters are 8x8", "expected the same spatial shape"),
    _qubiq_case("QUBIQ mask not 0/1", lambda r: write_nifti(r / "Validation/case05/task01_seg02.nii.gz", np.full((16, 16), 255, np.uint8)),
                "case05/task01_seg02.nii.gz", "values 255", "expected only 0 and 1 (QUBIQ masks are 0/1)"),
    _qubiq_case("QUBIQ case with no rater", lambda r: [p.unlink() for p in (r / "Validation/case04").glob("task01_*")], "case04", "has no rater for task01"),
    Bad("--task not present", lambda c: [*c.fit_data(c.qubiq()), "--task", "task02"], 2, ("--task task02", "not present", "task01")),
    _qubiq_case("NIfTI not 2-D or 3-D", lambda r: write_nifti(r / "Training/case03/image.nii.gz", np.zeros((16, 16, 2, 2, 2), np.uint8)),
                "case03/image.nii.gz", "5-D", "expected a 2-D image or a 3-D volume"),
    Bad("pickle with a foreign global", lambda c: c.fit_data(write_evil_lidc(c.tmp / "data_lidc.pickle", c.tmp / "PWNED")), 1,
        ("data_lidc.pickle", "refused to load the global io.open", "may only hold numpy arrays")),
    Bad("truncated pickle", lambda c: c.fit_data(_truncated_pickle(c.tmp / "data_lidc.pickle")), 1, ("data_lidc.pickle", "truncated or not a pickle")),
    Bad("pickle record without masks", lambda c: c.fit_data(write_lidc(c.tmp / "data_lidc.pickle", {"k1": lidc_record("s1"), "k2": _without(lidc_record("s2"), "masks")})), 1,
        ("data_lidc.pickle", "record 'k2' lacks 'masks'", "expected keys image, masks, series_uid")),
    Bad("masks of different sizes in one record", lambda c: c.fit_data(write_lidc(c.tmp / "data_lidc.pickle", {"k1": _odd_mask(lidc_record("s1"))})), 1,
        ("data_lidc.pickle", "record 'k1'", "'masks'[1] is 8x8 but 'masks'[0] is 16x16")),
    Bad("pickle that crashes numpy's own unpickling", lambda c: c.fit_data(_bytes(c.tmp / "data_lidc.pickle", segfault_pickle())), 1,
        ("data_lidc.pickle", "refused the numpy dtype 'V8'", "only bool, integer, float and complex numbers")),
    Bad("pickle calling numpy.ndarray", lambda c: c.fit_data(_bytes(c.tmp / "data_lidc.pickle", object_array_pickle())), 1,
        ("data_lidc.pickle", "refused numpy.ndarray(...) called directly")),
    Bad("pickle array with fewer bytes than its shape needs", lambda c: c.fit_data(_bytes(c.tmp / "data_lidc.pickle", short_data_pickle())), 1,
        ("data_lidc.pickle", "needs 40,000,000,000 bytes where the pickle gives 16")),
    Bad("pickle declaring more bytes than the file holds", lambda c: c.fit_data(_bytes(c.tmp / "data_lidc.pickle", huge_bytes_pickle())), 1,
        ("data_lidc.pickle", "truncated or not a pickle", "the file has 19 left")),
    Bad("pickle over the records and raters cap", lambda c: c.fit_data(_bytes(c.tmp / "data_lidc.pickle", many_raters_pickle(600, 10_000))), 1,
        ("data_lidc.pickle", "600 records of up to 10,000 raters", "5,000,000 images and masks per file")),
]  # fmt: skip


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_pickle(path: Path) -> Path:
    write_lidc(path, {f"k{i}": lidc_record(f"s{i}") for i in range(3)})
    path.write_bytes(path.read_bytes()[:300])
    return path


def _without(rec: dict, key: str) -> dict:
    del rec[key]
    return rec


def _odd_mask(rec: dict) -> dict:
    rec["masks"][1] = np.zeros((8, 8), np.uint8)
    return rec


def _touch(p: Path) -> Path:
    p.write_text("x")
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def _unreadable_lgg(ctx: Ctx) -> Path:
    root = ctx.lgg()
    _unreadable(ctx, root)
    return root


def _touch_json(path: Path) -> Path:
    path.write_text('{"not": "a config"}')
    return path


def _fit(*args):
    return lambda c: ["fit", *TINY, "--out", str(c.tmp / "out"), *args]


OPTION_CASES = [
    Bad("unknown --model", _fit("--model", "nope"), 2, ("--model", "'nope'", "unknown model", "unet", "import path")),
    Bad("--model import path that does not import", _fit("--model", "no_such_pkg.models:Net"), 2, ("--model 'no_such_pkg.models:Net'", "no module named 'no_such_pkg'")),
    Bad("--model import path to something not a SegModel", _fit("--model", "pathlib:Path"), 2, ("--model 'pathlib:Path'", "not a subclass of pyroseg.models.SegModel")),
    Bad("--tensorboard without the extra", lambda c: (c.monkeypatch.setitem(__import__("sys").modules, "tensorboard", None),
                                                      ["fit", *TINY, "--out", str(c.tmp / "out"), "--tensorboard"])[1],
        2, ("--tensorboard", "pip install 'pyroseg[tensorboard]'")),
    Bad("--config and --resume", lambda c: ["fit", "--config", str(c.run / "config.json"), "--resume", str(c.run)], 2, ("--config with --resume", "give one or the other")),
    Bad("--config not a pyroseg config", lambda c: ["fit", "--config", str(_touch_json(c.tmp / "other.json")), "--out", str(c.tmp / "o")], 1, ("other.json", "not a pyroseg config")),
    Bad("--image-size not a power of two", _fit("--image-size", "48"), 2, ("--image-size 48", "expected a power of two")),
    Bad("--image-size too small for the network", _fit("--image-size", "8"), 2, ("--image-size 8", "too small")),
    Bad("--epochs 0", _fit("--epochs", "0"), 2, ("--epochs 0", "expected at least 1")),
    Bad("--batch-size 0", _fit("--batch-size", "0"), 2, ("--batch-size 0", "expected at least 1")),
    Bad("--val-samples 0", _fit("--val-samples", "0"), 2, ("--val-samples 0", "expected at least 1")),
    Bad("--lr 0", _fit("--lr", "0"), 2, ("--lr 0", "expected a positive learning rate")),
    Bad("--clip-norm 0", _fit("--clip-norm", "0"), 2, ("--clip-norm 0", "expected a positive norm")),
    Bad("--max-nonfinite 0", _fit("--max-nonfinite", "0"), 2, ("--max-nonfinite 0", "expected at least 1")),
    Bad("--checkpoint-every 0", _fit("--checkpoint-every", "0"), 2, ("--checkpoint-every 0", "expected at least 1")),
    Bad("--widths not integers", _fit("--widths", "8,x"), 2, ("--widths", "expected comma-separated integers")),
    Bad("--model-arg without =", _fit("--model-arg", "nonsense"), 2, ("--model-arg 'nonsense'", "expected KEY=VALUE")),
    Bad("--model-arg the model lacks", _fit("--model-arg", "no_such_knob=3"), 2, ("--model-arg 'no_such_knob'", "has no such hyper-parameter")),
    Bad("--model-arg latent_dim not positive", _fit("--model", "prob_unet", "--model-arg", "latent_dim=-3"), 2, ("--model-arg latent_dim=-3", "expected a positive integer")),
    Bad("--model-arg rank not an integer", _fit("--model", "ssn", "--model-arg", "rank=abc"), 2, ("--model-arg rank='abc'", "expected a positive integer")),
    Bad("--model-arg latent_dims of the wrong length", _fit("--model", "hvae", "--model-arg", "latent_dims=[4,4]"), 2, ("--model-arg latent_dims=[4, 4]", "expected a list of 3 positive integers")),
    Bad("--model-arg dropout outside [0, 1)", _fit("--model", "mc_dropout", "--model-arg", "dropout=1.5"), 2, ("--model-arg dropout=1.5", "expected a rate in [0, 1)")),
    Bad("--objective geco with a model without a KL", _fit("--model", "ssn", "--objective", "geco"), 2, ("--objective geco", "ssn has no KL term", "--objective elbo")),
    Bad("--init-seed negative", _fit("--init-seed", "-1"), 2, ("--init-seed -1", "expected an integer >= 0")),
    Bad("ensemble of one run", lambda c: ["ensemble", str(c.run), "--out", str(c.tmp / "e")], 2, ("RUNS", "expected at least 2 run folders")),
    Bad("ensemble of runs of another image size", lambda c: ["ensemble", str(c.run), str(c.trained["unet64"]), "--out", str(c.tmp / "e")], 2, ("unet64", "image_size 64", "must share data, image size and split")),
    Bad("ensemble with a run given twice", lambda c: ["ensemble", str(c.trained["unet"]), str(c.trained["unet"]) + "/", "--out", str(c.tmp / "e")], 2, ("RUNS", "given twice")),
    Bad("ensemble --out already holds a run", lambda c: ["ensemble", str(c.trained["unet"]), str(c.run), "--out", str(c.run)], 2, ("--out {run}", "already holds a run")),
    Bad("unknown --objective", _fit("--objective", "vi"), 2, ("--objective", "'vi' is not one of")),
    Bad("--geco-kappa not a number", _fit("--objective", "geco", "--geco-kappa", "abc"), 2, ("--geco-kappa 'abc'", "expected nats per pixel")),
    Bad("--geco-kappa negative", _fit("--objective", "geco", "--geco-kappa", "-0.1"), 2, ("--geco-kappa -0.1", "expected a positive number")),
    Bad("--geco-rate 0", _fit("--objective", "geco", "--geco-rate", "0"), 2, ("--geco-rate 0.0", "expected a positive rate")),
    Bad("--geco-alpha outside [0, 1)", _fit("--objective", "geco", "--geco-alpha", "1.5"), 2, ("--geco-alpha 1.5", "expected a decay in [0, 1)")),
    Bad("--free-bits negative", _fit("--free-bits", "-1"), 2, ("--free-bits -1.0", "expected >= 0 nats")),
    Bad("--num-samples 0 (evaluate)", lambda c: ["evaluate", str(c.run), "--num-samples", "0"], 2, ("--num-samples 0", "expected at least 1")),
    Bad("--num-samples 0 (sample)", lambda c: [*_sample(c), "--num-samples", "0"], 2, ("--num-samples 0", "expected at least 1")),
    Bad("--batch-size 0 (evaluate)", lambda c: ["evaluate", str(c.run), "--batch-size", "0"], 2, ("--batch-size 0", "expected at least 1")),
    Bad("unknown --split", lambda c: ["evaluate", str(c.run), "--split", "nope"], 2, ("--split", "'nope' is not one of")),
    Bad("sample --input missing", lambda c: ["sample", str(c.run), "--input", str(c.tmp / "missing.png"), "--out", str(c.tmp / "o")], 2, ("--input", "missing.png", "does not exist")),
    Bad("evaluate --oracle on data without a known distribution", lambda c: ["evaluate", str(c.run), "--oracle", "--device", "cpu"], 2, ("--oracle", "synthetic-ambiguous")),
    Bad("evaluate --json in a missing folder", lambda c: ["evaluate", str(c.run), "--json", str(c.tmp / "no" / "r.json")], 2, ("--json", "its folder does not exist")),
    Bad("evaluate --checkpoint best without best.pt",
        lambda c: ((c.run / "best.pt").unlink(missing_ok=True), ["evaluate", str(c.run), "--checkpoint", "best"])[1], 2,
        ("--checkpoint best", "no best.pt", "use --checkpoint last")),
    Bad("sample without --input or --split", lambda c: ["sample", str(c.run), "--out", str(c.tmp / "o")], 2, ("--input or --split", "give exactly one")),
    Bad("sample with both --input and --split", lambda c: ["sample", str(c.run), "--split", "test", "--input", str(c.tmp), "--out", str(c.tmp / "o")], 2, ("--input or --split", "give exactly one")),
    Bad("--num-images 0", lambda c: ["sample", str(c.run), "--split", "test", "--num-images", "0", "--out", str(c.tmp / "o")], 2, ("--num-images 0", "expected at least 1")),
    Bad("sample --input not an image", lambda c: ["sample", str(c.run), "--input", str(_touch(c.tmp / "notes.txt")), "--out", str(c.tmp / "o")], 2, ("--input", "notes.txt", "expected an image")),
]  # fmt: skip


def _no_gpu_cuda(ctx: Ctx) -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    return ["fit", *TINY[:-3], "--device", "cuda", "--quiet", "--out", str(ctx.tmp / "out")]


def _read_only_out(ctx: Ctx) -> list[str]:
    """An --out whose parent cannot be written: chmod 555, or (as root) a parent that is a regular file."""
    parent = ctx.tmp / "locked"
    if ROOT_USER:
        _touch(parent)
    else:
        parent.mkdir()
        parent.chmod(0o555)
        ctx.cleanup.append(lambda: parent.chmod(0o755))
    return ["fit", *TINY, "--out", str(parent / "run")]


RUN_FOLDER_CASES = [
    Bad("--device cuda without a GPU", _no_gpu_cuda, 2, ("--device cuda", "no CUDA GPU is available here")),
    Bad("output folder not writable", _read_only_out, 2, ("--out", "locked/run", "cannot write there")),
    Bad("--out is a file", lambda c: ["fit", *TINY, "--out", str(_touch(c.tmp / "afile"))], 2, ("--out", "afile", "is a file")),
    Bad("--out already holds a run", lambda c: ["fit", *TINY, "--out", str(c.run)], 2, ("--out {run}", "already holds a run", "--resume", "--overwrite")),
    Bad("--overwrite with bad --data", lambda c: ["fit", *TINY, "--out", str(c.run), "--overwrite", "--data", str(c.tmp / "nowhere")], 1, ("nowhere", "does not exist")),
    Bad("--resume and --overwrite", lambda c: ["fit", "--resume", str(c.run), "--overwrite"], 2, ("--resume and --overwrite", "one or the other")),
    Bad("--resume with other options", lambda c: ["fit", "--resume", str(c.run), "--lr", "0.1", "--model", "vae"], 2, ("--model, --lr with --resume", "keeps its saved options", "only --epochs")),
    Bad("--resume a folder without a run", lambda c: ["fit", "--resume", str(_mkdir(c.tmp / "empty"))], 2, ("--resume", "empty", "no checkpoint.pt there")),
    Bad("--resume a missing folder", lambda c: ["fit", "--resume", str(c.tmp / "nowhere")], 2, ("--resume", "nowhere", "no such run folder")),
    Bad("evaluate a missing folder", lambda c: ["evaluate", str(c.tmp / "nowhere")], 2, ("RUN_DIR", "nowhere", "not a folder")),
    Bad("evaluate a folder that is not a run", lambda c: ["evaluate", str(_mkdir(c.tmp / "notes"))], 1, ("notes/config.json", "is this a pyroseg run folder")),
    Bad("plot a folder that is not a run", lambda c: ["plot", str(_mkdir(c.tmp / "notes"))], 1, ("notes/metrics.csv", "is this a pyroseg run folder")),
    Bad("disk full while writing a checkpoint", lambda c: (_disk_full(c, "checkpoint.pt"), _resume(c))[1], 1,
        ("{run}/checkpoint.pt", "could not write checkpoint", "No space left on device", "the previous one is intact"),
        keep=("checkpoint.pt", "metrics.csv", "split.json")),
    Bad("disk full while writing metrics.csv", lambda c: (_disk_full(c, "metrics.csv"), _resume(c))[1], 1,
        ("No space left on device", "{run}/metrics.csv"), keep=("metrics.csv", "split.json")),
]  # fmt: skip


def _truncated(c):
    p = c.run / "checkpoint.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(c):
    (c.run / "checkpoint.pt").write_bytes(np.random.default_rng(0).bytes(4096))


# damage done to the run copy, then each of fit --resume / evaluate / sample must refuse it
DAMAGED_RUNS = [
    ("truncated checkpoint", _truncated, ("{run}/checkpoint.pt", "truncated or corrupted")),
    ("corrupted checkpoint", _garbage, ("{run}/checkpoint.pt", "refused", "corrupted")),
    ("checkpoint that would run code", _evil_checkpoint, ("{run}/checkpoint.pt", "refused", "could run code")),
    ("checkpoint of a newer format", lambda c: _edit_checkpoint(c.run, format_version=ck.FORMAT_VERSION + 1),
     ("{run}/checkpoint.pt", "checkpoint format 2", "reads up to 1", "upgrade pyroseg")),
    ("checkpoint of another model", lambda c: shutil.copy(c.trained["prob_unet"] / "checkpoint.pt", c.run),
     ("{run}/checkpoint.pt", "not the checkpoint of this run", "model 'prob_unet' (config.json: 'unet')")),
    ("checkpoint of another image size", lambda c: shutil.copy(c.trained["unet64"] / "checkpoint.pt", c.run),
     ("{run}/checkpoint.pt", "image_size 64 (config.json: 32)")),
    ("checkpoint of another run", lambda c: _edit_checkpoint(c.run, config={"seed": 7, "lr": 0.5}),
     ("{run}/checkpoint.pt", "lr 0.5 (config.json: 0.001)", "seed 7 (config.json: 0)")),
    ("checkpoint.pt missing", lambda c: (c.run / "checkpoint.pt").unlink(), ("checkpoint.pt",)),
    ("config from a newer version", lambda c: _edit_config(c.run, lambda d: d.update(config_version=2)),
     ("{run}/config.json", "config version 2", "reads up to version 1", "upgrade pyroseg")),
    ("config with unknown fields", lambda c: _edit_config(c.run, lambda d: d["fit"].update(geco_goal=0.1)),
     ("{run}/config.json", "unknown fields ['geco_goal']", "newer pyroseg")),
    ("config not JSON", lambda c: (c.run / "config.json").write_text('{"fit": '), ("{run}/config.json", "unreadable config")),
    ("config.json missing", lambda c: (c.run / "config.json").unlink(), ("config.json",)),
]  # fmt: skip


def _damaged(what, damage, names, opener):
    def build(c):
        damage(c)
        return OPENERS[opener](c)

    code = 2 if (what == "checkpoint.pt missing" and opener == "fit --resume") else 1
    return Bad(f"{what} ({opener})", build, code, names)


DAMAGED_CASES = [_damaged(w, d, n, o) for (w, d, n) in DAMAGED_RUNS for o in OPENERS]
TABLE = DATA_CASES + OPTION_CASES + RUN_FOLDER_CASES + DAMAGED_CASES


# --------------------------------------------------------------------------- the test


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line_error(result, code: int, names: list[str]) -> str:
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"uncaught: {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    return errors[0]


def _check(case: Bad, tmp_path: Path, trained: dict, monkeypatch, debug: bool = False):
    run = tmp_path / "run"
    shutil.copytree(trained["unet"], run)
    ctx = Ctx(tmp_path, run, trained, monkeypatch)
    args = case.build(ctx)
    before = _snapshot(run)
    outs = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--out"]
    new_outs = [o for o in outs if not o.exists()]
    result = CliRunner().invoke(cli, (["--debug"] if debug else []) + args)
    for undo in ctx.cleanup:
        undo()
    if debug:
        return result
    names = [n.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)) for n in case.names]
    line = _one_line_error(result, case.code, names)
    after = _snapshot(run)
    keep = before if case.keep == ("*",) else {k: before[k] for k in case.keep}
    for name, data in keep.items():
        assert after.get(name) == data, f"{name} of the existing run changed"
    assert not [n for n in after if n.endswith(".tmp")], "a temporary file was left"
    assert not (tmp_path / "PWNED").exists(), "opening a checkpoint ran code"
    assert "weights_only" not in line and "safe_globals" not in line  # never advise loading unsafely
    for o in new_outs:  # an --out that the failed command created holds nothing
        assert not o.exists() or not any(o.iterdir()), sorted(p.name for p in o.iterdir())
    return line


@pytest.mark.parametrize("case", TABLE, ids=[c.what for c in TABLE])
def test_bad_input(case, tmp_path, trained, monkeypatch):
    _check(case, tmp_path, trained, monkeypatch)


_BY_WHAT = {c.what: c for c in TABLE}


@pytest.mark.parametrize(
    "what, error",
    [
        ("--epochs 0", "UsageError"),
        ("truncated TIFF", "DataError"),
        ("checkpoint of another model (evaluate)", "CheckpointError"),
        ("disk full while writing a checkpoint", "CheckpointError"),
        ("disk full while writing metrics.csv", "OSError"),
    ],
)
def test_debug_lets_the_exception_through(what, error, tmp_path, trained, monkeypatch):
    """--debug: the exception itself (click prints its traceback), not the one line."""
    result = _check(_BY_WHAT[what], tmp_path, trained, monkeypatch, debug=True)
    assert error in [c.__name__ for c in type(result.exception).__mro__], repr(result.exception)
    assert result.exit_code != 0 and not isinstance(result.exception, SystemExit)
    assert not [line for line in result.stderr.splitlines() if line.startswith("Error:")]  # not the one-line form


def _troubleshooting_rows() -> list[str]:
    text = TROUBLESHOOTING.read_text()
    section = text.split("## Every error, and what to do", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| ")]


def test_troubleshooting_lists_every_row():
    """The Troubleshooting page's table has a row for every bad input tested here
    (damaged runs are listed once for the three commands)."""
    rows = set(_troubleshooting_rows())
    missing = []
    for case in TABLE:
        what = case.what.rsplit(" (", 1)[0] if case in DAMAGED_CASES else case.what
        if what not in rows:
            missing.append(what)
    assert not missing, f"{TROUBLESHOOTING} lacks: {sorted(set(missing))}"


def test_the_payload_is_real(tmp_path, trained):
    """The 'checkpoint that would run code' rows test something: an unsafe load runs it."""
    ctx = Ctx(tmp_path, tmp_path / "run", trained, pytest.MonkeyPatch())
    shutil.copytree(trained["unet"], ctx.run)
    _evil_checkpoint(ctx)
    with pytest.raises(CheckpointError):
        ck.load_checkpoint(ctx.run / "checkpoint.pt")
    assert not (tmp_path / "PWNED").exists()
    torch.load(ctx.run / "checkpoint.pt", weights_only=False)["payload"].close()
    assert (tmp_path / "PWNED").exists()
