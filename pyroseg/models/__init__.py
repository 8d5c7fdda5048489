"""The models, one file each, and the registry from name to class.

``build_model(name, **hparams)`` makes one; ``MODELS`` lists them. To add a
model: subclass :class:`~pyroseg.models.base.SegModel` in a new file, define
``model``, ``guide`` and ``sample``, and add it to ``MODELS`` below.
"""

from __future__ import annotations

from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel, mask_likelihood
from pyroseg.models.ensemble import EnsembleModel
from pyroseg.models.hprob_unet import HProbUNetModel
from pyroseg.models.hvae import HVAEModel
from pyroseg.models.mc_dropout import MCDropoutModel
from pyroseg.models.prob_unet import ProbUNetModel
from pyroseg.models.skip_vae import SkipVAEModel
from pyroseg.models.ssn import SSNModel
from pyroseg.models.unet import UNetModel
from pyroseg.models.vae import VAEModel

__all__ = ["MODELS", "COMPOSITES", "EnsembleModel", "SegModel", "build_model", "mask_likelihood"]

MODELS: dict[str, type[SegModel]] = {
    cls.name: cls for cls in (UNetModel, VAEModel, SkipVAEModel, HVAEModel, ProbUNetModel, HProbUNetModel, SSNModel,
                             MCDropoutModel)
}


#: Models a run folder can hold that ``fit`` does not train: an ensemble is made
#: from trained runs (``pyroseg ensemble``).
COMPOSITES: dict[str, type[SegModel]] = {EnsembleModel.name: EnsembleModel}


def build_model(name: str, **hparams) -> SegModel:
    """Build the model registered as ``name`` (``--model``), or a composite (``ensemble``)."""
    try:
        cls = MODELS[name] if name in MODELS else COMPOSITES[name]
    except KeyError:
        raise UsageError(f"--model {name!r}: unknown model; expected one of {', '.join(MODELS)}") from None
    try:
        return cls(**hparams)
    except TypeError as e:  # an unknown --model-arg: one line, not a traceback
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).rsplit("argument", 1)[-1].strip()
        raise UsageError(f"--model-arg {bad}: model {name!r} has no such hyper-parameter") from None
