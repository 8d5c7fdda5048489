"""``pyroseg fit``: train one model and write a run folder.

Also: ``--config RUN/config.json`` trains a saved configuration again (options
given on the command line override the file's), ``--model package.module:Class``
trains a model defined outside pyroseg, and ``--tensorboard`` writes TensorBoard
event files beside the run (:mod:`pyroseg.tensorboard`).

The options that say what to train are generated from :class:`pyroseg.config.FitConfig`'s
fields (:mod:`cli.options`): a new one is a field there, not an option here. The options
here say how to run it (``--resume``, ``--launcher``, ``--tensorboard``, ...).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource
from pyroseg.cli.common import CONTEXT, LoadBar, handle_errors, stderr_is_terminal
from pyroseg.cli.options import config_options, given_on_command_line, read_options

from pyroseg.config import FitConfig, load_config_json
from pyroseg.errors import UsageError


class BarCallbacks:
    """Progress of ``fit`` on standard error (a :class:`pyroseg.train.FitCallbacks`).

    On a terminal: a tqdm bar per epoch, the epoch's summary in the bar's
    postfix. Otherwise (``bars=False``; the default when standard error is not a
    terminal): one line when the data is loaded and one line per epoch, with the
    same figures. ``quiet``: nothing but the data line's absence, as ever.
    """

    def __init__(self, quiet: bool = False, *, bars: bool | None = None):
        self.quiet = quiet
        self.bars = stderr_is_terminal() if bars is None else bars
        self.bar = None
        self.load = LoadBar("decoding data", bar=self.bars)
        self.t_load = time.perf_counter()
        self.t_epoch = 0.0
        self.epoch_label = ""
        self.shown = 0.0  # when the bar last showed a step's loss (time.monotonic)

    def on_load_progress(self, done, total):
        if not self.quiet and self.bars:  # without bars, the data line below says when loading ended
            self.load(done, total)

    def on_data(self, s):
        self.load.close()
        if not self.quiet:
            took = "" if self.bars else f"  (loaded in {time.perf_counter() - self.t_load:.1f} s)"
            click.echo(
                f"data: {s['source']}  {s['n_patients']} patients, {s['n_slices']} slices at {s['image_size']}x{s['image_size']} "
                f"(train {s['train_patients']} patients / {s['train_slices']} slices, val {s['val_patients']}, "
                f"test {s['test_patients']} patients){took}",
                err=True,
            )

    def on_epoch_start(self, epoch, epochs, num_batches):
        self.epoch_label = f"epoch {epoch + 1}/{epochs}"
        self.t_epoch = time.perf_counter()
        if not self.quiet and self.bars:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=num_batches, desc=self.epoch_label, unit="batch", file=sys.stderr, leave=True)

    def on_step(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            now = time.monotonic()
            if now - self.shown >= 1.0:  # reading the loss waits for the GPU: once a second, not every step
                self.shown = now
                self.bar.set_postfix_str(f"loss {float(loss):.1f}", refresh=False)

    @staticmethod
    def summary(row: dict) -> str:
        """The figures of an epoch's row, as the bar's postfix and the log line show them."""
        parts = [f"loss {row['train_loss']:.1f}"]
        if "val_loss" in row:
            parts.append(f"val -ELBO {row['val_loss']:.1f}")
        parts += [f"{k[4:]} {v:.2f}" for k, v in row.items() if k.startswith("val_kl_")]
        if "geco_lambda" in row:
            parts.append(f"lambda {row['geco_lambda']:.3g}")
        if "val_dice_tumour" in row:
            parts.append(f"val dice {row['val_dice_all']:.3f} / tumour {row['val_dice_tumour']:.3f}")
        return ", ".join(parts)

    def on_epoch_end(self, row):
        if self.bar is not None:
            self.bar.set_postfix_str(self.summary(row))
            self.bar.close()
            self.bar = None
        elif not self.quiet and not self.bars:
            took = time.perf_counter() - self.t_epoch
            click.echo(f"{self.epoch_label}: {self.summary(row)}  ({took:.1f} s)", err=True)

    def on_early_stop(self, epoch, best):
        if not self.quiet:
            click.echo(f"stopped early after epoch {epoch}: {best.get('metric', 'the --select-by score')} did not improve "
                       f"(best {best.get('value', float('nan')):.4f} at epoch {best.get('epoch', '-')})", err=True)


class FanOut:
    """Several FitCallbacks as one (progress on stderr, TensorBoard, ...)."""

    def __init__(self, *callbacks):
        self.callbacks = [c for c in callbacks if c is not None]

    def __getattr__(self, name):
        hooks = [getattr(c, name) for c in self.callbacks if hasattr(c, name)]  # a hook one of them lacks: skipped

        def call(*args, **kwargs):
            for h in hooks:
                h(*args, **kwargs)

        return call


@click.command("fit", context_settings=CONTEXT)
@click.option("--config", "config_file", type=click.Path(exists=True), default=None,
              help="Train the configuration in this config.json (or run folder) again; options given on the "
                   "command line override the file's [default --out: <its run folder>-rerun].")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this folder from its last checkpoint, with its saved options "
                   "(--epochs: the total to train, default the run's).")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@config_options()
@click.option("--checkpoint-every", type=int, default=None, help="Also checkpoint every N steps (always at epoch ends).")
@click.option("--launcher", type=click.Choice(["none", "torchrun"]), default="none", show_default=True,
              help="torchrun: start --nproc-per-node data-parallel processes on this machine (torchrun --standalone).")
@click.option("--nproc-per-node", type=int, default=None, help="Processes for --launcher torchrun (one per GPU, or CPU processes).")
@click.option("--tensorboard", is_flag=True,
              help="Also write TensorBoard event files (per-epoch scalars, the validation samples) to RUN/tensorboard "
                   "(needs pip install 'pyroseg[tensorboard]').")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="Write the TensorBoard event files here instead (implies --tensorboard).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@handle_errors
def fit_cmd(config_file, resume_dir, overwrite, checkpoint_every, launcher, nproc_per_node, tensorboard, log_dir, quiet,
            **options):
    """Train a model; write config, split, metrics, checkpoint and pictures to a run folder.

    Data-parallel: `torchrun --nproc_per_node N -m pyroseg fit ...` (or `--launcher torchrun
    --nproc-per-node N`); --batch-size is then the global batch, split evenly over the processes.

    Again: `pyroseg fit --config runs/x/config.json --out runs/y [--seed 1 ...]`.
    """
    from pyroseg import distributed

    if launcher == "torchrun":
        _exec_torchrun(nproc_per_node)
    elif nproc_per_node is not None:
        raise UsageError("--nproc-per-node: only with --launcher torchrun")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every {checkpoint_every}: expected at least 1")
    tb_dir = _tensorboard_dir(tensorboard, log_dir)  # before anything is trained: a missing extra is an option error
    config = _fit_config(options, resume_dir, config_file)
    from pyroseg.train import fit

    rank, _ = distributed.env_rank()
    board = None
    if tb_dir is not None and rank == 0:
        from pyroseg.tensorboard import TensorBoardCallbacks

        board = TensorBoardCallbacks(Path(config.out) / "tensorboard" if tb_dir == "" else tb_dir, config=config)
    with distributed.collective_errors():
        try:
            run = fit(config, callbacks=FanOut(BarCallbacks(quiet or rank != 0), board), resume=bool(resume_dir),
                      overwrite=overwrite, checkpoint_every=checkpoint_every)
            if board is not None:
                board.add_run_pictures(Path(run))
        finally:
            if board is not None:
                board.close()
    if rank == 0:
        _report(Path(run), board.log_dir if board is not None else None)


def _fit_config(options: dict, resume_dir: str | None, config_file: str | None) -> FitConfig:
    """The FitConfig to train: of the options (``--out``'s default: runs/<model>), of ``--config``'s
    file with the options given on the command line in place of the file's, or (``--resume``) the
    saved run's, which train.fit reads (here: only the folder and any --epochs)."""
    given = given_on_command_line()
    if resume_dir:
        if config_file:
            raise UsageError(f"--config with --resume {resume_dir}: a resumed run keeps its saved options; give one or the other")
        _refuse_options_on_resume(resume_dir)
        budgets = {k: options[k] for k in ("max_steps", "max_minutes") if k in given}  # how much longer to train
        return FitConfig(out=resume_dir, epochs=options["epochs"] if "epochs" in given else 0, **budgets)
    values = read_options(options)
    if config_file:
        return _config_from_file(config_file, {name: value for name, value in values.items() if name in given})
    _check_model(values["model"])
    if "out" not in given:
        values["out"] = f"runs/{values['model']}"
    return FitConfig(**values).validate()


def _strip_launcher(args: list[str]) -> list[str]:
    """The command line without --launcher / --nproc-per-node (each with its value)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--launcher", "--nproc-per-node"):
            skip = True
        elif not a.startswith(("--launcher=", "--nproc-per-node=")):
            out.append(a)
    return out


def _exec_torchrun(nproc_per_node: int | None) -> None:
    """Replace this process with ``torchrun --standalone --nproc_per_node N -m pyroseg <same arguments>``."""
    from pyroseg import distributed

    if distributed.launched_by_torchrun():
        raise UsageError("--launcher torchrun: this process was already started by torchrun; drop --launcher")
    if nproc_per_node is None or nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node {nproc_per_node}: give the number of processes (at least 1) for --launcher torchrun")
    cmd = distributed.torchrun_command(nproc_per_node, _strip_launcher(sys.argv[1:]))
    click.echo("starting: " + " ".join(cmd), err=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


#: What ``--resume`` accepts beside itself; every other option is the saved run's.
_RESUME_OPTIONS = {"resume_dir", "epochs", "max_steps", "max_minutes", "checkpoint_every", "quiet", "overwrite",
                   "tensorboard", "log_dir"}


def _check_model(ref: str) -> None:
    """An unknown --model is an option error, found before anything is written."""
    from pyroseg.models import resolve_model

    resolve_model(ref)


def _tensorboard_dir(tensorboard: bool, log_dir: str | None) -> str | None:
    """``None``: no TensorBoard; ``""``: RUN/tensorboard; else the folder. Refuses,
    saying how to install it, when the optional extra is missing."""
    if not tensorboard and log_dir is None:
        return None
    from pyroseg.tensorboard import require_tensorboard

    require_tensorboard("--log-dir" if log_dir is not None else "--tensorboard")
    return log_dir or ""


def _config_from_file(path: str, given: dict) -> FitConfig:
    """The FitConfig of ``--config PATH`` (a config.json or a run folder), with the values of the
    options ``given`` on the command line in place of the file's (``--model-arg``: added to them)."""
    src = Path(path)
    if src.is_dir():
        src = src / "config.json"
    doc = load_config_json(src)
    config = FitConfig.from_dict(doc["fit"])
    changes = {name: {**old, **value} if isinstance(old := getattr(config, name), dict) else value
               for name, value in given.items()}
    _check_model(changes.get("model", config.model))  # an external model's module must import here too
    changes.setdefault("out", str(src.resolve().parent) + "-rerun")
    return dataclasses.replace(config, **changes, source_config=str(src.resolve())).validate()


def _refuse_options_on_resume(resume_dir: str) -> None:
    """``--resume`` continues a run with its saved options: refuse others given
    on the command line rather than silently ignore them."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params
             if p.name not in _RESUME_OPTIONS and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    if given:
        raise UsageError(f"{', '.join(given)} with --resume {resume_dir}: a resumed run keeps its saved options; "
                         "only --epochs, --max-steps, --max-minutes and --checkpoint-every may be given")


def _report(run: Path, tensorboard_dir: Path | None = None) -> None:
    from pyroseg.runs import read_metrics_csv

    rows = read_metrics_csv(run / "metrics.csv")
    last = rows[-1] if rows else {}
    click.echo(f"\nfinished: {run}")
    if last:
        dice = f"val dice_all {last.get('val_dice_all', float('nan')):.3f}, dice_tumour {last.get('val_dice_tumour', float('nan')):.3f}"
        click.echo(f"  after epoch {int(last['epoch'])}: train loss {last['train_loss']:.1f}, {dice}")
    if (run / "best.pt").exists():
        from pyroseg.checkpoint import load_checkpoint

        best = load_checkpoint(run / "best.pt").get("best") or {}
        click.echo(f"  best: epoch {best.get('epoch')} by {best.get('metric')} {float(best.get('value', float('nan'))):.3f} (best.pt)")
    for name, what in [("config.json", "config, versions"), ("split.json", "patients per split"),
                       ("metrics.csv", "per-epoch metrics"), ("checkpoint.pt", "weights and training state"),
                       ("best.pt", "weights of the best validation epoch: what evaluate / sample use"),
                       ("curves.png", "training curves"), ("val_samples.png", "validation samples and uncertainty")]:
        if (run / name).exists():
            click.echo(f"  {run / name}  ({what})")
    if tensorboard_dir is not None:
        click.echo(f"  {tensorboard_dir}/  (TensorBoard: tensorboard --logdir {tensorboard_dir})")
    click.echo(f"next: pyroseg evaluate {run}   |   pyroseg sample {run} --input IMAGE_OR_FOLDER --out DIR")
