"""The configuration of a training run, and the versions written beside it.

A :class:`FitConfig` is all ``pyroseg fit`` needs; its JSON form
(``config.json`` in the run folder) rebuilds the model and the data exactly.
Configs are only ever read as JSON: opening a run never executes code.

Each field that is a ``fit`` option is defined once, here, with :func:`option`:
its default, help, choices and check. The command line is generated from these
fields (``cli/options.py``: one click option per field, in field order), and
:meth:`FitConfig.validate` runs the same checks on a config from any source.
Adding a ``fit`` option is one field definition here plus its use.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from pyroseg.errors import CheckpointError, UsageError

__all__ = ["FitConfig", "CONFIG_VERSION", "Option", "Text", "BadText", "option", "config_options", "flag_of", "read_option",
           "ELBOS", "OBJECTIVES", "GECO_CONSTRAINTS", "GECO_UPDATES", "AUGMENTS", "LR_SCHEDULES", "SELECT_MODES", "SELECT_BY",
           "DEVICES", "DATA_ON_DEVICE", "versions", "load_config_json"]

#: The values of the choice options, defined once: checked here, implemented in
#: :func:`pyroseg.train.make_elbo` (``ELBOS``), :mod:`pyroseg.geco`, :mod:`pyroseg.augment`,
#: :mod:`pyroseg.schedules`, :mod:`pyroseg.train` (``SELECT_MODES``) and :mod:`pyroseg.data.device`.
ELBOS = ("meanfield", "trace")
OBJECTIVES = ("elbo", "geco")
GECO_CONSTRAINTS = ("topk", "mean")
GECO_UPDATES = ("softplus", "multiplicative")
AUGMENTS = ("none", "flip", "standard")
#: how a training image meets its raters (--raters): one drawn per step, or all of them
RATERS = ("one", "all")
LR_SCHEDULES = ("constant", "cosine", "step")
#: The validation columns that can pick best.pt, and whether more or less is better.
SELECT_MODES = {"val_dice_tumour": "max", "val_dice_all": "max", "val_loss": "min", "val_ged": "min"}
SELECT_BY = ("auto", *SELECT_MODES)
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N
DATA_ON_DEVICE = ("auto", "on", "off")
#: The point predictions evaluate can score (what each is: :data:`pyroseg.predict.POINT_PREDICTIONS`).
POINTS = ("auto", "mean", "majority", "mean-z")

#: Fields older configs have that no longer exist, dropped on reading: ``num_workers``
#: never reached the DataLoader (the data is in memory, and the random annotator of each
#: slice is drawn from the main process's RNG, which crash-exact resume restores).
_RETIRED = ("num_workers",)
#: What a config.json written before a field existed meant by its absence: that
#: version's behaviour, which may differ from today's default.
_LEGACY = {"augment": "none", "lr_schedule": "constant", "lr_warmup": 0.0, "select_by": "auto", "patience": None}

#: Bumped when the meaning of a config field changes; a run written by a newer
#: version is refused rather than misread.
CONFIG_VERSION = 1


class BadText(ValueError):
    """Command-line text that an option cannot read: ``text``, the offending part, and what was expected."""

    def __init__(self, text: Any, expected: str):
        super().__init__(expected)
        self.text = text


@dataclass(frozen=True)
class Text:
    """How an option whose value is not a plain number or string is written on the command line:
    ``parse`` reads the text (raising :class:`BadText`), ``format`` writes a value (the default shown)."""

    parse: Callable[[Any], Any]
    format: Callable[[Any], Any]
    multiple: bool = False  # repeatable: the text is a tuple of the given values
    metavar: str | None = None


@dataclass(frozen=True)
class Option:
    """A :class:`FitConfig` field as a ``fit`` option (the field's ``metadata["option"]``).

    ``help``: the option's help. ``choices``: the values allowed. ``check``: a test the value
    must pass (a field whose default is ``None`` always accepts ``None``: unset), refused with
    ``message`` (after the option and the value: ``--epochs 0: expected at least 1``).
    ``default_text``: the default the help shows when it is derived from other fields rather
    than the field's value. ``flag``: the option's name when not the field's name with dashes
    (``--model-arg``). ``text``: how a value not a number or a string is written. ``folder``:
    the value is a folder. ``cli``: ``False`` for a checked field that no option sets.
    """

    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None
    message: str = ""
    default_text: str | None = None
    flag: str | None = None
    text: Text | None = None
    folder: bool = False
    cli: bool = True

    def accepts(self, value: Any, default: Any) -> bool:
        if value is None and default is None:
            return True
        if self.choices and value not in self.choices:
            return False
        return self.check is None or bool(self.check(value))

    @property
    def refusal(self) -> str:
        """What the error says after the option and the value."""
        return self.message or f"expected one of {', '.join(self.choices)}"


def option(default: Any = MISSING, *, help: str, factory: Callable[[], Any] | Any = MISSING, **spec: Any) -> Any:
    """A :class:`FitConfig` field that is a ``fit`` option: its default (or ``factory``), and the
    :class:`Option` ``help`` and ``spec`` (choices, check, message, ...)."""
    return field(default=default, default_factory=factory, metadata={"option": Option(help=help, **spec)})


def _either(values: tuple[str, ...]) -> str:
    """``a, b or c``."""
    return f"{', '.join(values[:-1])} or {values[-1]}"


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise BadText(text, "expected comma-separated integers, e.g. 16,32,64,128") from None


def _parse_kappa(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise BadText(text, "expected nats per pixel (e.g. 0.02) or auto") from None


def _parse_model_args(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadText(item, "expected KEY=VALUE, e.g. latent_dim=16")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


_WIDTHS = Text(_parse_widths, lambda v: ",".join(map(str, v)))
_KAPPA = Text(_parse_kappa, lambda v: "auto" if v is None else str(v))
_MODEL_ARGS = Text(_parse_model_args, lambda d: tuple(f"{k}={json.dumps(v)}" for k, v in d.items()), multiple=True,
                   metavar="KEY=VALUE")
_AT_LEAST_1 = {"check": lambda v: v >= 1, "message": "expected at least 1"}
_EPOCHS = {"check": lambda v: v >= 0, "message": "expected >= 0 epochs"}


@dataclass
class FitConfig:
    """Everything one training run depends on: the options of ``pyroseg fit``, one field each."""

    model: str = option("unet", help="A built-in model (unet, prob_unet, ...: `pyroseg models` lists them), an import path "
                        "package.module:Class of your own SegModel, or an entry point of the group pyroseg.models.")
    # the data: its source, and how it is read
    data: str = option("synthetic", help="'synthetic', 'synthetic-ambiguous', a folder in the LGG kaggle_3m layout, a QUBIQ "
                       "task folder (NIfTI, several raters), or a LIDC data_lidc.pickle (or a folder of them).")
    task: str | None = option(None, help="QUBIQ: the task (task01, ...) when the cases hold several.",
                              check=lambda v: isinstance(v, str) and v.strip() != "", message="expected a task name such as task01")
    slice_axis: int = option(-1, help="QUBIQ: the axis a 3-D NIfTI volume is sliced along into 2-D items (-1: the last).",
                             check=lambda v: isinstance(v, int) and -3 <= v <= 2, message="a 3-D volume has axes 0, 1, 2 (or -1, -2, -3)")
    image_size: int = option(64, help="Training size (power of two).")
    synthetic_patients: int = option(20, help="Synthetic data: the number of patients generated.")
    synthetic_slices: int = option(16, help="Synthetic data: the slices of each patient.")
    cache_dir: str | None = option(None, help="Where decoded LGG data is cached.", folder=True,
                                   default_text="$PYROSEG_CACHE_DIR or ~/.cache/pyroseg")
    # the run
    epochs: int = option(20, help="Epochs to train.", **_AT_LEAST_1)
    batch_size: int = option(32, help="Slices per training step (under torchrun: the global batch, split over the processes).",
                             **_AT_LEAST_1)
    lr: float = option(1e-3, help="Adam learning rate.", check=lambda v: v > 0, message="expected a positive learning rate")
    device: str = option("auto", help=f"{_either(DEVICES)}.", check=lambda v: v in DEVICES or v.startswith("cuda:"),
                         message=f"expected {_either(DEVICES)}")
    seed: int = option(0, help="Seeds weights, split, shuffling and sampling.")
    # seed of the weights, the shuffle and the sampling noise (deep ensembles); the data and
    # the split always come from --seed, so members that differ only here share them
    init_seed: int | None = option(None, help="Seeds weights, shuffling and sampling only; data and split stay --seed's "
                                   "(deep-ensemble members).", check=lambda v: isinstance(v, int) and v >= 0,
                                   message="expected an integer >= 0")
    # seed of the data (the synthetic generator) and of the patient split; None: `seed`.
    # `pyroseg compare --seeds` holds it fixed so that the seeds vary only weights, z noise and order.
    data_seed: int | None = option(None, help="Seeds the data and the split only.", cli=False,
                                   check=lambda v: isinstance(v, int), message="expected an integer")
    out: str = option("runs/unet", help="Run folder.", folder=True, default_text="runs/<model>")
    # split by patient (checked together by validate())
    val_fraction: float = option(0.15, help="Share of patients for validation.")
    test_fraction: float = option(0.15, help="Share of patients held out for test.")
    # objective
    elbo: str = option("meanfield", choices=ELBOS, message=f"expected {_either(ELBOS)}",
                       help="meanfield: analytic KL per site (TraceMeanField_ELBO); trace: Monte Carlo KL (Trace_ELBO).")
    beta: float = option(1.0, help="Final KL weight.", check=lambda v: v >= 0, message="expected >= 0")
    beta_warmup: float | None = option(None, help="Epochs of linear KL warm-up from 0 to the final KL weight (0: constant).",
                                       default_text="a quarter of the training: --epochs, or --max-steps", **_EPOCHS)  # see beta_warmup_epochs
    beta_cycle: float = option(0.0, help="Cyclical KL annealing period in epochs (0: off).", **_EPOCHS)
    objective: str = option("elbo", choices=OBJECTIVES, message=f"expected {_either(OBJECTIVES)}",
                            help="elbo: beta-weighted ELBO; geco: minimise KL subject to a reconstruction target "
                                 "(Rezende & Viola 2018).")
    # GECO (pyroseg.geco) as in DeepMind's HPU-Net code: the constraint on a stochastic top-k of the
    # pixels ("topk") or on the mean over the image ("mean", pyroseg's earlier variant); the multiplier
    # as softplus(w)^2 by gradient ascent ("softplus") or by lambda *= exp(rate * C) ("multiplicative")
    geco_constraint: str = option("topk", choices=GECO_CONSTRAINTS, message=f"expected {_either(GECO_CONSTRAINTS)}",
                                  help="topk: cross-entropy of a stochastic top-k of the pixels, kappa per selected pixel "
                                       "(DeepMind's HPU-Net); mean: mean cross-entropy over the image, kappa per pixel "
                                       "(pyroseg's earlier variant).")
    geco_top_k: float = option(0.02, help="Share of the batch's pixels in the topk constraint.",
                               check=lambda v: 0 < v <= 1, message="expected a share of the pixels in (0, 1]")
    geco_deterministic_top_k: bool = option(False, help="topk: the largest cross-entropies instead of a draw.")
    geco_update: str = option("softplus", choices=GECO_UPDATES, message=f"expected {_either(GECO_UPDATES)}",
                              help="softplus: lambda = softplus(w)^2, w by gradient ascent (DeepMind); multiplicative: "
                                   "lambda *= exp(rate * C_ma) (Rezende & Viola's Algorithm 1; pyroseg's earlier variant).")
    geco_kappa: float | None = option(None, text=_KAPPA, check=lambda v: v > 0,
                                      message="expected a positive number of nats per pixel (or auto)",
                                      help="GECO target reconstruction error: nats per selected pixel (topk; auto: 0.05), or "
                                           "nats per pixel (mean; auto: a quarter of the error of predicting the training "
                                           "set's lesion share everywhere).")
    geco_alpha: float = option(0.99, help="GECO moving-average decay of the constraint.",
                               check=lambda v: 0 <= v < 1, message="expected a decay in [0, 1)")
    geco_rate: float | None = option(None, help="GECO multiplier rate: the gradient scale on w (softplus) or log lambda's "
                                     "step per unit of C_ma (multiplicative).", default_text="1e-2 softplus, 1 multiplicative",
                                     check=lambda v: v > 0, message="expected a positive rate")  # resolved by validate()
    geco_warmup: float | None = option(None, help="Epochs with lambda fixed at 1 before GECO moves it.",
                                       default_text="0 softplus, a tenth of --epochs multiplicative", **_EPOCHS)
    geco_max_step: float = option(0.01, help="Bound on |change of log lambda| per step.",
                                  check=lambda v: v > 0, message="expected a positive bound")
    free_bits: float = option(0.0, help="Floor in nats on each latent site's batch-mean KL (Kingma et al. 2016); 0: off.",
                              check=lambda v: v >= 0, message="expected >= 0 nats")
    clip_norm: float | None = option(None, help="Clip the global gradient norm to this value.",
                                     check=lambda v: v > 0, message="expected a positive norm")
    max_nonfinite: int = option(20, help="Stop after this many non-finite steps in a row.", **_AT_LEAST_1)
    # evaluation during training
    val_samples: int = option(4, help="Samples per image for the validation Dice each epoch.", **_AT_LEAST_1)
    collapse_diagnostics: bool = option(True, help="Each epoch, active units and the effect of each latent site on the "
                                        "validation prediction.")
    # on every validation slice the diagnostics took longer than hprob_unet's training epoch (docs/guide/comparing.md)
    collapse_slices: int = option(32, help="Validation slices (a fixed, evenly spaced subset) the per-epoch collapse "
                                  "diagnostics look at; 0: all.", check=lambda v: v >= 0, message="expected >= 0 (0: every slice)")
    # the model: hyper-parameters beyond the shared backbone (latent sizes, ...), and the backbone
    model_args: dict = option(factory=dict, flag="--model-arg", text=_MODEL_ARGS,
                              help="Model hyper-parameter, e.g. latent_dim=16 (repeatable).")
    widths: tuple[int, ...] = option((16, 32, 64, 128), text=_WIDTHS, help="Encoder widths, comma-separated.")
    # speed: channels-last weights and activations (measured 1.2-1.27x faster steps on CPU); on a GPU,
    # training arrays resident on the device, batches gathered there (pyroseg.data.device)
    channels_last: bool = option(True, help="Channels-last memory format for training (about 1.2x faster steps on CPU).")
    data_on_device: str = option("auto", choices=DATA_ON_DEVICE, message=f"expected {_either(DATA_ON_DEVICE)}",
                                 help="Keep the training data on the device and gather batches there (auto: on a GPU when "
                                      "it takes under a quarter of its free memory).")
    # training recipe (docs/guide/training-recipe.md)
    augment: str = option("none", choices=AUGMENTS, help="Random transforms of the training batches only: flip (left-right), "
                          "standard (flip, rotation +-15 deg, scale 0.9-1.1, gamma, contrast, noise). "
                          "See docs/guide/training-recipe.md.")
    raters: str = option("one", choices=RATERS, message=f"expected {_either(RATERS)}",
                         help="On data with several raters per slice: one: each training image paired with one of its "
                              "raters, drawn per step (Kohl et al. 2018); all: with every one of its raters in the same "
                              "step (the loss is the mean over the (image, rater) pairs, each with its own posterior "
                              "draw; a step costs as many passes as the slices have raters).")
    lr_schedule: str = option("constant", choices=LR_SCHEDULES, help="Learning rate after the warm-up: constant, cosine "
                              "(to 0 at the last epoch) or step (/10 at 50 % and 75 %).")
    lr_warmup: float = option(0.0, help="Epochs of linear learning-rate warm-up from 0 to --lr.", **_EPOCHS)
    select_by: str = option("auto", choices=SELECT_BY, help="Validation score that picks best.pt (evaluate and sample use "
                            "it by default); auto: val_dice_tumour on one-annotator data, val_ged on data with several annotators.")
    patience: int | None = option(None, help="Stop after this many validations (epochs, unless --val-every) without a "
                                  "better --select-by score (a tie with a lower validation loss counts as better; for a latent model, "
                                  "counted after the KL warm-up).", default_text="never", check=lambda v: v >= 1,
                                  message="expected at least 1 validation")
    # budgets in steps and time, validation by steps (docs/guide/training.md, "Budgets"); training.json records the stop
    max_steps: int | None = option(None, help="Optimiser steps to train, stopping mid-epoch if need be; given, --epochs "
                                   "no longer stops training and the learning-rate schedule ends at this step.",
                                   default_text="--epochs", **_AT_LEAST_1)
    val_every: int | None = option(None, help="Validate (a metrics.csv row, best.pt, a --patience count) every this many "
                                   "optimiser steps.", default_text="every epoch", **_AT_LEAST_1)
    max_minutes: float | None = option(None, help="Wall-clock minutes of training (of this call: a resume starts them "
                                       "again); stops at the step boundary after them.", default_text="no limit",
                                       check=lambda v: v > 0, message="expected a positive number of minutes")
    # cross-validation by patient (pyroseg.data.split.split_for): with folds > 1 the run tests on part `fold`
    # of the patients dealt into `folds` parts; validation comes from the other parts; test_fraction is unused
    folds: int = option(1, help="Cross-validation by patient: deal the patients into this many parts and test on part "
                        "--fold (1: one split by --val-fraction / --test-fraction).", **_AT_LEAST_1)
    fold: int = option(0, help="With --folds K: the part of the patients tested on (0 .. K-1).",
                       check=lambda v: isinstance(v, int) and v >= 0, message="expected 0 .. --folds - 1")
    # provenance: the config.json this run was trained again from (``fit --config``); None: from options
    source_config: str | None = None

    @property
    def train_seed(self) -> int:
        """The seed of the weights, the shuffle and the noise (``init_seed``, else ``seed``)."""
        return self.seed if self.init_seed is None else self.init_seed

    def validate(self) -> FitConfig:
        """Refuse values that cannot work, naming the option (UsageError, exit 2): each field's
        check (:func:`option`), and resolve defaults that depend on other fields (``beta_warmup``, ...)."""
        if self.beta_warmup is None and self.max_steps is None:
            self.beta_warmup = self.beta_warmup_epochs(self.epochs)
        if self.geco_rate is None:
            self.geco_rate = 1e-2 if self.geco_update == "softplus" else 1.0
        if self.geco_warmup is None:
            self.geco_warmup = 0.0 if self.geco_update == "softplus" else round(0.1 * self.epochs, 4)
        vf, tf = self.val_fraction, self.test_fraction
        if not (0 <= vf < 1 and 0 <= tf < 1 and vf + tf < 1):
            raise UsageError(f"{flag_of('val_fraction')} {vf} / {flag_of('test_fraction')} {tf}: "
                             "expected fractions in [0, 1) summing below 1")
        if self.fold >= self.folds:
            raise UsageError(f"--fold {self.fold}: expected 0 .. {self.folds - 1} with --folds {self.folds}")
        for f in dataclasses.fields(self):
            opt, value = f.metadata.get("option"), getattr(self, f.name)
            if opt is not None and not opt.accepts(value, f.default):
                shown = repr(value) if isinstance(value, str) else value
                raise UsageError(f"{flag_of(f.name)} {shown}: {opt.refusal}")
        return self

    def beta_warmup_epochs(self, horizon: float) -> float:
        """The KL warm-up in epochs: ``beta_warmup``, or by default a quarter of the training's
        ``horizon`` epochs (``--epochs``, or ``--max-steps`` over the steps per epoch: known only
        once the data is, so a step-budgeted config keeps ``None`` and the run resolves it);
        0 with GECO (it balances the terms through lambda) or a cyclical schedule."""
        if self.beta_warmup is not None:
            return self.beta_warmup
        anneal = self.beta_cycle == 0 and self.objective != "geco"
        return round(0.25 * horizon, 4) if anneal else 0.0

    def source_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pyroseg.data.load_source` that rebuild this run's data
        (besides ``spec`` and ``image_size``)."""
        return {"seed": self.seed_of_data(), "synthetic_patients": self.synthetic_patients, "synthetic_slices": self.synthetic_slices,
                "cache_dir": self.cache_dir, "task": self.task, "slice_axis": self.slice_axis}

    def seed_of_data(self) -> int:
        """The seed of the data and the patient split: ``data_seed``, or ``seed`` when unset."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in _RETIRED}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"config has unknown fields {unknown}: written by a newer pyroseg?")
        d = {**_LEGACY, **d}
        if d.get("objective") == "geco":  # a GECO run written before topk / softplus existed: its rule, not today's default
            d.setdefault("geco_constraint", "mean")
            d.setdefault("geco_update", "multiplicative")
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


def config_options(*, cli: bool = True) -> dict[str, Option]:
    """The fields of :class:`FitConfig` that are options, in field order (``cli=False``: checked fields too)."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(FitConfig)
            if "option" in f.metadata and (f.metadata["option"].cli or not cli)}


def flag_of(name: str) -> str:
    """The option that sets field ``name`` (``--batch-size``, ``--model-arg``); a field that no
    option sets is named as it is (``data_seed``)."""
    opt = config_options(cli=False)[name]
    return (opt.flag or "--" + name.replace("_", "-")) if opt.cli else name


def read_option(name: str, given: Any) -> Any:
    """The value of field ``name`` from what the command line gave: the text read, for an
    option written as text (``--widths 8,16``, ``--geco-kappa auto``); a bad one refused
    naming the option (UsageError)."""
    opt = config_options()[name]
    if opt.text is None:
        return given
    try:
        return opt.text.parse(given)
    except BadText as e:
        raise UsageError(f"{flag_of(name)} {e.text!r}: {e}") from None


def versions() -> dict[str, str]:
    """Versions of everything a result depends on."""
    import numpy
    import PIL
    import pyro
    import torch

    import pyroseg

    return {
        "pyroseg": pyroseg.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cuda": str(torch.version.cuda),
    }


def load_config_json(path: str | Path) -> dict[str, Any]:
    """Read a run's ``config.json`` (JSON only: nothing is executed)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json here; is this a pyroseg run folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("fit"), dict):
        raise CheckpointError(f"{path}: not a pyroseg config (no 'fit' section)")
    ver = doc.get("config_version")
    if not isinstance(ver, int) or ver > CONFIG_VERSION:
        raise CheckpointError(
            f"{path}: config version {ver!r}, this pyroseg reads up to version {CONFIG_VERSION}; upgrade pyroseg"
        )
    model = doc.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("hparams"), dict)):
        raise CheckpointError(f"{path}: not a pyroseg config (no 'model' section with name and hparams)")
    try:
        FitConfig.from_dict(doc["fit"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{path}: unreadable 'fit' section ({e})") from None
    return doc
