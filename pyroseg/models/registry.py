"""The registry from ``--model`` to a model class: built-in names, import paths and entry points.

:mod:`pyroseg.models` re-exports everything here (see its docs); a composite model (the
ensemble) imports this module to build its members, and is registered in
:data:`COMPOSITES` by :mod:`pyroseg.models`, so that no module imports another that
imports it back.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel
from pyroseg.models.hprob_unet import HProbUNetModel
from pyroseg.models.hvae import HVAEModel
from pyroseg.models.mc_dropout import MCDropoutModel
from pyroseg.models.phiseg import PHiSegModel
from pyroseg.models.prob_unet import ProbUNetModel
from pyroseg.models.skip_vae import SkipVAEModel
from pyroseg.models.ssn import SSNModel
from pyroseg.models.unet import UNetModel
from pyroseg.models.vae import VAEModel

__all__ = ["MODELS", "COMPOSITES", "ENTRY_POINT_GROUP", "build_model", "resolve_model", "model_import_path"]

MODELS: dict[str, type[SegModel]] = {
    cls.name: cls for cls in (UNetModel, VAEModel, SkipVAEModel, HVAEModel, ProbUNetModel, HProbUNetModel, SSNModel,
                             MCDropoutModel, PHiSegModel)
}


#: Models a run folder can hold that ``fit`` does not train (an ensemble is made
#: from trained runs, ``pyroseg ensemble``): registered by :mod:`pyroseg.models`,
#: so that a composite can build its members through this registry without the
#: registry importing it.
COMPOSITES: dict[str, type[SegModel]] = {}


#: The entry-point group through which installed packages offer models.
ENTRY_POINT_GROUP = "pyroseg.models"


def _import_path(ref: str) -> type:
    """``"package.module:Class"`` (``Class`` may be dotted) -> the object."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--model {ref!r}: expected an import path package.module:Class")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` does: the current folder's modules too
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself (or its package) is missing
            raise UsageError(f"--model {ref!r}: no module named {e.name!r} (is it installed, or in the current folder?)") from None
        raise
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"--model {ref!r}: module {module_name!r} has no {attr!r}") from None
    return obj


def _entry_point_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def resolve_model(ref: str) -> type[SegModel]:
    """The model class that ``--model ref`` names: a built-in name (``MODELS``),
    an import path ``package.module:Class``, or an entry point of the group
    ``pyroseg.models``. Anything else, or a class that is not a
    :class:`~pyroseg.models.base.SegModel`, is a :class:`UsageError`."""
    if ref in MODELS:
        return MODELS[ref]
    if ref in COMPOSITES:
        return COMPOSITES[ref]
    if ":" in ref:
        cls = _import_path(ref)
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ref]
        if not found:
            installed = _entry_point_names()
            extra = f"; installed entry points ({ENTRY_POINT_GROUP}): {', '.join(installed)}" if installed else ""
            raise UsageError(f"--model {ref!r}: unknown model; expected one of {', '.join(MODELS)}{extra}, "
                             "or an import path package.module:Class")
        cls = found[0].load()
    if not (isinstance(cls, type) and issubclass(cls, SegModel)):
        raise UsageError(f"--model {ref!r}: {cls!r} is not a subclass of pyroseg.models.SegModel")
    return cls


def model_import_path(model: SegModel | type[SegModel]) -> str | None:
    """``"package.module:Class"`` for a model defined outside pyroseg's registry
    (what a run records to open it again); ``None`` for a built-in one."""
    cls = model if isinstance(model, type) else type(model)
    if MODELS.get(cls.name) is cls:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def build_model(name: str, **hparams) -> SegModel:
    """Build the model ``name`` (``--model``: a built-in name, an import path
    ``package.module:Class`` or an entry point; see :func:`resolve_model`)."""
    cls = resolve_model(name)
    try:
        return cls(**hparams)
    except TypeError as e:  # an unknown --model-arg: one line, not a traceback
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).rsplit("argument", 1)[-1].strip()
        raise UsageError(f"--model-arg {bad}: model {name!r} has no such hyper-parameter") from None
