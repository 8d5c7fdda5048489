"""The models, one file each, and the registry from name to class.

``build_model(name, **hparams)`` makes one; ``MODELS`` lists the built-in ones.
``--model`` (and :func:`resolve_model`) also takes a model defined outside
pyroseg, without editing it:

* an import path ``"package.module:Class"`` (the current folder is searched
  too, as ``python -m`` would), or
* the name of an entry point in the group ``pyroseg.models``
  (:data:`ENTRY_POINT_GROUP`) of an installed package, e.g. in its
  ``pyproject.toml``: ``[project.entry-points."pyroseg.models"]``
  ``my_unet = "mypkg.models:MyUNet"``.

The class must subclass :class:`~pyroseg.models.base.SegModel`. A run of such a
model records the import path in its ``config.json`` (``model.import_path``),
so ``evaluate``, ``sample`` and ``fit --resume`` import it again; opening such
a run therefore imports (runs) that module, unlike a run of a built-in model.

To add a built-in model: subclass :class:`~pyroseg.models.base.SegModel` in a
new file, define ``model``, ``guide`` and ``sample``, and add it to ``MODELS`` in
:mod:`pyroseg.models.registry`.
"""

from __future__ import annotations

from pyroseg.models.base import SegModel, mask_likelihood
from pyroseg.models.ensemble import EnsembleModel
from pyroseg.models.registry import COMPOSITES, ENTRY_POINT_GROUP, MODELS, build_model, model_import_path, resolve_model

__all__ = ["MODELS", "COMPOSITES", "ENTRY_POINT_GROUP", "EnsembleModel", "SegModel", "build_model", "resolve_model",
           "model_import_path", "mask_likelihood"]

COMPOSITES[EnsembleModel.name] = EnsembleModel
