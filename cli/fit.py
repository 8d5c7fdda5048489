"""``pyroseg fit``: train one model and write a run folder.

Also: ``--config RUN/config.json`` trains a saved configuration again (options
given on the command line override the file's), ``--model package.module:Class``
trains a model defined outside pyroseg, and ``--tensorboard`` writes TensorBoard
event files beside the run (:mod:`pyroseg.tensorboard`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from cli.common import CONTEXT, LoadBar, handle_errors, stderr_is_terminal
from pyroseg.config import AUGMENTS, LR_SCHEDULES, SELECT_BY, FitConfig, load_config_json
from pyroseg.errors import UsageError

_DEFAULTS = FitConfig()


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


def _parse_model_args(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. latent_dim=16")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


@click.command("fit", context_settings=CONTEXT)
@click.option("--model", default=_DEFAULTS.model, show_default=True,
              help="A built-in model (unet, prob_unet, ...: `pyroseg models` lists them), an import path "
                   "package.module:Class of your own SegModel, or an entry point of the group pyroseg.models.")
@click.option("--config", "config_file", type=click.Path(exists=True), default=None,
              help="Train the configuration in this config.json (or run folder) again; options given on the "
                   "command line override the file's [default --out: <its run folder>-rerun].")
@click.option("--data", default=_DEFAULTS.data, show_default=True,
              help="'synthetic', 'synthetic-ambiguous', a folder in the LGG kaggle_3m layout, a QUBIQ task folder "
                   "(NIfTI, several raters), or a LIDC data_lidc.pickle (or a folder of them).")
@click.option("--task", default=None, help="QUBIQ: the task (task01, ...) when the cases hold several.")
@click.option("--slice-axis", type=int, default=_DEFAULTS.slice_axis, show_default=True,
              help="QUBIQ: the axis a 3-D NIfTI volume is sliced along into 2-D items (-1: the last).")
@click.option("--image-size", type=int, default=_DEFAULTS.image_size, show_default=True, help="Training size (power of two).")
@click.option("--epochs", type=int, default=None, help=f"Epochs to train [default: {_DEFAULTS.epochs}; with --resume or --config: the run's].")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True, help="Adam learning rate.")
@click.option("--device", default=_DEFAULTS.device, show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seeds weights, split, shuffling and sampling.")
@click.option("--init-seed", type=int, default=None,
              help="Seeds weights, shuffling and sampling only; data and split stay --seed's (deep-ensemble members).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder [default: runs/<model>].")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this folder from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@click.option("--beta", type=float, default=_DEFAULTS.beta, show_default=True, help="Final KL weight.")
@click.option("--beta-warmup", type=float, default=None,
              help="Epochs of linear KL warm-up from 0 to --beta (0: constant) [default: a quarter of --epochs].")
@click.option("--beta-cycle", type=float, default=_DEFAULTS.beta_cycle, show_default=True,
              help="Cyclical KL annealing period in epochs (0: off).")
@click.option("--elbo", type=click.Choice(["meanfield", "trace"]), default=_DEFAULTS.elbo, show_default=True,
              help="meanfield: analytic KL per site (TraceMeanField_ELBO); trace: Monte Carlo KL (Trace_ELBO).")
@click.option("--objective", type=click.Choice(["elbo", "geco"]), default=_DEFAULTS.objective, show_default=True,
              help="elbo: beta-weighted ELBO; geco: minimise KL subject to a reconstruction target (Rezende & Viola 2018).")
@click.option("--geco-constraint", type=click.Choice(["topk", "mean"]), default=_DEFAULTS.geco_constraint, show_default=True,
              help="topk: cross-entropy of a stochastic top-k of the pixels, kappa per selected pixel (DeepMind's HPU-Net); "
                   "mean: mean cross-entropy over the image, kappa per pixel (pyroseg before issue 13).")
@click.option("--geco-top-k", type=float, default=_DEFAULTS.geco_top_k, show_default=True,
              help="Share of the batch's pixels in the topk constraint.")
@click.option("--geco-deterministic-top-k", is_flag=True, help="topk: the largest cross-entropies instead of a draw.")
@click.option("--geco-update", type=click.Choice(["softplus", "multiplicative"]), default=_DEFAULTS.geco_update, show_default=True,
              help="softplus: lambda = softplus(w)^2, w by gradient ascent (DeepMind); multiplicative: "
                   "lambda *= exp(rate * C_ma) (Rezende & Viola's Algorithm 1).")
@click.option("--geco-kappa", default="auto", show_default=True,
              help="GECO target reconstruction error: nats per selected pixel (topk; auto: 0.05), or nats per pixel "
                   "(mean; auto: a quarter of the error of predicting the training set's lesion share everywhere).")
@click.option("--geco-alpha", type=float, default=_DEFAULTS.geco_alpha, show_default=True,
              help="GECO moving-average decay of the constraint.")
@click.option("--geco-rate", type=float, default=None,
              help="GECO multiplier rate: the gradient scale on w (softplus) or log lambda's step per unit of C_ma "
                   "(multiplicative) [default: 1e-2 softplus, 1 multiplicative].")
@click.option("--geco-warmup", type=float, default=None,
              help="Epochs with lambda fixed at 1 before GECO moves it [default: 0 softplus, a tenth of --epochs multiplicative].")
@click.option("--geco-max-step", type=float, default=_DEFAULTS.geco_max_step, show_default=True,
              help="Bound on |change of log lambda| per step.")
@click.option("--free-bits", type=float, default=_DEFAULTS.free_bits, show_default=True,
              help="Floor in nats on each latent site's batch-mean KL (Kingma et al. 2016); 0: off.")
@click.option("--clip-norm", type=float, default=None, help="Clip the global gradient norm to this value.")
@click.option("--max-nonfinite", type=int, default=_DEFAULTS.max_nonfinite, show_default=True,
              help="Stop after this many non-finite steps in a row.")
@click.option("--val-fraction", type=float, default=_DEFAULTS.val_fraction, show_default=True, help="Share of patients for validation.")
@click.option("--test-fraction", type=float, default=_DEFAULTS.test_fraction, show_default=True, help="Share of patients held out for test.")
@click.option("--val-samples", type=int, default=_DEFAULTS.val_samples, show_default=True,
              help="Samples per image for the validation Dice each epoch.")
@click.option("--collapse-diagnostics/--no-collapse-diagnostics", default=True, show_default=True,
              help="Each epoch, active units and the effect of each latent site on the validation prediction.")
@click.option("--collapse-slices", type=int, default=_DEFAULTS.collapse_slices, show_default=True,
              help="Validation slices (a fixed, evenly spaced subset) the per-epoch collapse diagnostics look at; 0: all.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Model hyper-parameter, e.g. latent_dim=16 (repeatable).")
@click.option("--widths", default=",".join(map(str, _DEFAULTS.widths)), show_default=True, help="Encoder widths, comma-separated.")
@click.option("--synthetic-patients", type=int, default=_DEFAULTS.synthetic_patients, show_default=True)
@click.option("--synthetic-slices", type=int, default=_DEFAULTS.synthetic_slices, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where decoded LGG data is cached [default: $PYROSEG_CACHE_DIR or ~/.cache/pyroseg].")
@click.option("--checkpoint-every", type=int, default=None, help="Also checkpoint every N steps (always at epoch ends).")
@click.option("--launcher", type=click.Choice(["none", "torchrun"]), default="none", show_default=True,
              help="torchrun: start --nproc-per-node data-parallel processes on this machine (torchrun --standalone).")
@click.option("--nproc-per-node", type=int, default=None, help="Processes for --launcher torchrun (one per GPU, or CPU processes).")
@click.option("--channels-last/--no-channels-last", default=_DEFAULTS.channels_last, show_default=True,
              help="Channels-last memory format for training (about 1.2x faster steps on CPU).")
@click.option("--augment", type=click.Choice(AUGMENTS), default=_DEFAULTS.augment, show_default=True,
              help="Random transforms of the training batches only: flip (left-right), standard (flip, rotation +-15 deg, "
                   "scale 0.9-1.1, gamma, contrast, noise). See docs/guide/training-recipe.md.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=_DEFAULTS.lr_schedule, show_default=True,
              help="Learning rate after the warm-up: constant, cosine (to 0 at the last epoch) or step (/10 at 50 % and 75 %).")
@click.option("--lr-warmup", type=float, default=_DEFAULTS.lr_warmup, show_default=True,
              help="Epochs of linear learning-rate warm-up from 0 to --lr.")
@click.option("--select-by", type=click.Choice(SELECT_BY), default=_DEFAULTS.select_by, show_default=True,
              help="Validation score that picks best.pt (evaluate and sample use it by default); auto: val_dice_tumour "
                   "on one-annotator data, val_ged on data with several annotators.")
@click.option("--patience", type=int, default=None,
              help="Stop after this many epochs without a better --select-by score [default: never].")
@click.option("--tensorboard", is_flag=True,
              help="Also write TensorBoard event files (per-epoch scalars, the validation samples) to RUN/tensorboard "
                   "(needs pip install 'pyroseg[tensorboard]').")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="Write the TensorBoard event files here instead (implies --tensorboard).")
@click.option("--data-on-device", type=click.Choice(["auto", "on", "off"]), default=_DEFAULTS.data_on_device, show_default=True,
              help="Keep the training data on the device and gather batches there (auto: on a GPU when it fits).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@handle_errors
def fit_cmd(model, data, task, slice_axis, image_size, epochs, batch_size, lr, device, seed, init_seed, out, resume_dir, overwrite, beta, beta_warmup,
            beta_cycle, elbo, objective, geco_constraint, geco_top_k, geco_deterministic_top_k, geco_update, geco_kappa, geco_alpha, geco_rate, geco_warmup, geco_max_step, free_bits,
            clip_norm, max_nonfinite, val_fraction, test_fraction, val_samples, collapse_diagnostics, collapse_slices, model_args, widths,
            synthetic_patients, synthetic_slices, cache_dir, checkpoint_every, channels_last, data_on_device, launcher, nproc_per_node,
            augment, lr_schedule, lr_warmup, select_by, patience, quiet, config_file, tensorboard, log_dir):
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
    try:
        widths_t = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise UsageError(f"--widths {widths!r}: expected comma-separated integers, e.g. 16,32,64,128") from None
    if geco_kappa == "auto":
        kappa = None
    else:
        try:
            kappa = float(geco_kappa)
        except ValueError:
            raise UsageError(f"--geco-kappa {geco_kappa!r}: expected nats per pixel (e.g. 0.02) or auto") from None
    if checkpoint_every is not None and checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every {checkpoint_every}: expected at least 1")
    tb_dir = _tensorboard_dir(tensorboard, log_dir)  # before anything is trained: a missing extra is an option error
    if resume_dir:
        if config_file:
            raise UsageError(f"--config with --resume {resume_dir}: a resumed run keeps its saved options; give one or the other")
        _refuse_options_on_resume(resume_dir)
        config = FitConfig(out=resume_dir, epochs=epochs or 0)
    elif config_file:
        config = _config_from_file(config_file, widths=widths_t, geco_kappa=kappa, model_args=_parse_model_args(model_args))
    else:
        _check_model(model)
        config = FitConfig(
            model=model, data=data, out=out or f"runs/{model}", image_size=image_size,
            epochs=_DEFAULTS.epochs if epochs is None else epochs, batch_size=batch_size, lr=lr, device=device,
            seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, elbo=elbo, beta=beta,
            beta_warmup=beta_warmup, beta_cycle=beta_cycle, objective=objective, geco_kappa=kappa, geco_alpha=geco_alpha,
            geco_rate=geco_rate, geco_warmup=geco_warmup, geco_max_step=geco_max_step, free_bits=free_bits, clip_norm=clip_norm, max_nonfinite=max_nonfinite,
            val_samples=val_samples, collapse_diagnostics=collapse_diagnostics, model_args=_parse_model_args(model_args), widths=widths_t,
            synthetic_patients=synthetic_patients, synthetic_slices=synthetic_slices, cache_dir=cache_dir,
            channels_last=channels_last, augment=augment, lr_schedule=lr_schedule, lr_warmup=lr_warmup,
            select_by=select_by, patience=patience,
            task=task, slice_axis=slice_axis,
            init_seed=init_seed,
            collapse_slices=collapse_slices,
            data_on_device=data_on_device,
            geco_constraint=geco_constraint, geco_top_k=geco_top_k,
            geco_deterministic_top_k=geco_deterministic_top_k, geco_update=geco_update,
        ).validate()
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
_RESUME_OPTIONS = {"resume_dir", "epochs", "checkpoint_every", "quiet", "overwrite", "tensorboard", "log_dir"}

#: Options of ``fit`` that are not FitConfig fields (how to run, not what to train).
_NOT_CONFIG = {"config_file", "resume_dir", "overwrite", "checkpoint_every", "launcher", "nproc_per_node", "quiet",
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


def _config_from_file(path: str, **parsed) -> FitConfig:
    """The FitConfig of ``--config PATH`` (a config.json or a run folder), with every
    option given on the command line in place of the file's. ``parsed``: the values
    of options that the command parses from text (widths, geco_kappa, model_args)."""
    import dataclasses

    src = Path(path)
    if src.is_dir():
        src = src / "config.json"
    doc = load_config_json(src)
    config = FitConfig.from_dict(doc["fit"])
    ctx = click.get_current_context()
    given = {p.name for p in ctx.command.params if ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE}
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    changes = {}
    for name in given - _NOT_CONFIG:
        if name == "model_args":
            changes[name] = {**config.model_args, **parsed[name]}
        elif name in parsed:
            changes[name] = parsed[name]
        elif name in fields:
            changes[name] = ctx.params[name]
    _check_model(changes.get("model", config.model))  # an external model's module must import here too
    if "out" not in changes:
        changes["out"] = str(src.resolve().parent) + "-rerun"
    return dataclasses.replace(config, **changes, source_config=str(src.resolve())).validate()


def _refuse_options_on_resume(resume_dir: str) -> None:
    """``--resume`` continues a run with its saved options: refuse others given
    on the command line rather than silently ignore them."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params
             if p.name not in _RESUME_OPTIONS and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    if given:
        raise UsageError(f"{', '.join(given)} with --resume {resume_dir}: a resumed run keeps its saved options; "
                         "only --epochs and --checkpoint-every may be given")


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
