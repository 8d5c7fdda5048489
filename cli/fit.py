"""``pyroseg fit``: train one model and write a run folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource
from tqdm.auto import tqdm

from cli.common import CONTEXT, LoadBar, handle_errors
from pyroseg import distributed
from pyroseg.config import FitConfig
from pyroseg.errors import UsageError
from pyroseg.models import MODELS
from pyroseg.train import FitCallbacks, fit

_DEFAULTS = FitConfig()


class BarCallbacks(FitCallbacks):
    """A tqdm bar per epoch; the epoch's summary in the bar's postfix."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        self.load = LoadBar("decoding data")

    def on_load_progress(self, done, total):
        if not self.quiet:
            self.load(done, total)

    def on_data(self, s):
        self.load.close()
        if not self.quiet:
            click.echo(
                f"data: {s['source']}  {s['n_patients']} patients, {s['n_slices']} slices at {s['image_size']}x{s['image_size']} "
                f"(train {s['train_patients']} patients / {s['train_slices']} slices, val {s['val_patients']}, "
                f"test {s['test_patients']} patients)",
                err=True,
            )

    def on_epoch_start(self, epoch, epochs, num_batches):
        if not self.quiet:
            self.bar = tqdm(total=num_batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", file=sys.stderr, leave=True)

    def on_step(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.1f}", refresh=False)

    def on_epoch_end(self, row):
        if self.bar is not None:
            parts = [f"loss {row['train_loss']:.1f}"]
            if "val_loss" in row:
                parts.append(f"val -ELBO {row['val_loss']:.1f}")
            parts += [f"{k[4:]} {v:.2f}" for k, v in row.items() if k.startswith("val_kl_")]
            if "geco_lambda" in row:
                parts.append(f"lambda {row['geco_lambda']:.3g}")
            if "val_dice_tumour" in row:
                parts.append(f"val dice {row['val_dice_all']:.3f} / tumour {row['val_dice_tumour']:.3f}")
            self.bar.set_postfix_str(", ".join(parts))
            self.bar.close()
            self.bar = None


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
@click.option("--model", type=click.Choice(list(MODELS)), default=_DEFAULTS.model, show_default=True, help="Which model.")
@click.option("--data", default=_DEFAULTS.data, show_default=True,
              help="'synthetic', 'synthetic-ambiguous', or a folder in the LGG kaggle_3m layout.")
@click.option("--image-size", type=int, default=_DEFAULTS.image_size, show_default=True, help="Training size (power of two).")
@click.option("--epochs", type=int, default=None, help=f"Epochs to train [default: {_DEFAULTS.epochs}; with --resume: the run's].")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True, help="Adam learning rate.")
@click.option("--device", default=_DEFAULTS.device, show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seeds weights, split, shuffling and sampling.")
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
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def fit_cmd(model, data, image_size, epochs, batch_size, lr, device, seed, out, resume_dir, overwrite, beta, beta_warmup,
            beta_cycle, elbo, objective, geco_constraint, geco_top_k, geco_deterministic_top_k, geco_update, geco_kappa, geco_alpha, geco_rate, geco_warmup, geco_max_step, free_bits,
            clip_norm, max_nonfinite, val_fraction, test_fraction, val_samples, collapse_diagnostics, model_args, widths,
            synthetic_patients, synthetic_slices, cache_dir, checkpoint_every, channels_last, launcher, nproc_per_node, quiet):
    """Train a model; write config, split, metrics, checkpoint and pictures to a run folder.

    Data-parallel: `torchrun --nproc_per_node N -m pyroseg fit ...` (or `--launcher torchrun
    --nproc-per-node N`); --batch-size is then the global batch, split evenly over the processes.
    """
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
    if resume_dir:
        _refuse_options_on_resume(resume_dir)
        config = FitConfig(out=resume_dir, epochs=epochs or 0)
    else:
        config = FitConfig(
            model=model, data=data, out=out or f"runs/{model}", image_size=image_size,
            epochs=_DEFAULTS.epochs if epochs is None else epochs, batch_size=batch_size, lr=lr, device=device,
            seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, elbo=elbo, beta=beta,
            beta_warmup=beta_warmup, beta_cycle=beta_cycle, objective=objective, geco_kappa=kappa, geco_alpha=geco_alpha,
            geco_rate=geco_rate, geco_warmup=geco_warmup, geco_max_step=geco_max_step, free_bits=free_bits, clip_norm=clip_norm, max_nonfinite=max_nonfinite,
            val_samples=val_samples, collapse_diagnostics=collapse_diagnostics, model_args=_parse_model_args(model_args), widths=widths_t,
            synthetic_patients=synthetic_patients, synthetic_slices=synthetic_slices, cache_dir=cache_dir,
            channels_last=channels_last, geco_constraint=geco_constraint, geco_top_k=geco_top_k,
            geco_deterministic_top_k=geco_deterministic_top_k, geco_update=geco_update,
        ).validate()
    rank, _ = distributed.env_rank()
    with distributed.collective_errors():
        run = fit(config, callbacks=BarCallbacks(quiet or rank != 0), resume=bool(resume_dir), overwrite=overwrite,
                  checkpoint_every=checkpoint_every)
    if rank == 0:
        _report(Path(run))


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
_RESUME_OPTIONS = {"resume_dir", "epochs", "checkpoint_every", "quiet", "overwrite"}


def _refuse_options_on_resume(resume_dir: str) -> None:
    """``--resume`` continues a run with its saved options: refuse others given
    on the command line rather than silently ignore them."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params
             if p.name not in _RESUME_OPTIONS and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    if given:
        raise UsageError(f"{', '.join(given)} with --resume {resume_dir}: a resumed run keeps its saved options; "
                         "only --epochs and --checkpoint-every may be given")


def _report(run: Path) -> None:
    from pyroseg.runs import read_metrics_csv

    rows = read_metrics_csv(run / "metrics.csv")
    last = rows[-1] if rows else {}
    click.echo(f"\nfinished: {run}")
    if last:
        dice = f"val dice_all {last.get('val_dice_all', float('nan')):.3f}, dice_tumour {last.get('val_dice_tumour', float('nan')):.3f}"
        click.echo(f"  after epoch {int(last['epoch'])}: train loss {last['train_loss']:.1f}, {dice}")
    for name, what in [("config.json", "config, versions"), ("split.json", "patients per split"),
                       ("metrics.csv", "per-epoch metrics"), ("checkpoint.pt", "weights and training state"),
                       ("curves.png", "training curves"), ("val_samples.png", "validation samples and uncertainty")]:
        if (run / name).exists():
            click.echo(f"  {run / name}  ({what})")
    click.echo(f"next: pyroseg evaluate {run}   |   pyroseg sample {run} --input IMAGE_OR_FOLDER --out DIR")
