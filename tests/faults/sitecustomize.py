"""Fault injection for the data-parallel tests (tests/test_distributed.py), loaded
by Python at start-up when this folder is on PYTHONPATH.

``PYROSEG_TEST_FAULT=KIND:RANK:BATCH`` makes the training batch number ``BATCH``
(0-based, counted over the run) of torchrun rank ``RANK`` go wrong:

* ``raise``: reading it raises :class:`pyroseg.errors.DataError` (a bad file on one shard);
* ``nan``: its images hold a NaN (a corrupt slice: a non-finite loss on that rank only);
* ``hang``: reading it blocks for 10 minutes (a stuck process or file system).

Only the batches of the training loader (``random_annotator=True``) count.
Nothing happens outside torchrun or on other ranks.
"""

import os

_spec = os.environ.get("PYROSEG_TEST_FAULT")
if _spec and os.environ.get("RANK") is not None:
    _kind, _rank, _batch = _spec.split(":")
    if int(os.environ["RANK"]) == int(_rank):
        import time

        from pyroseg.data import core
        from pyroseg.errors import DataError

        _orig = core.SegDataset.__getitems__
        _count = {"n": 0}

        def _faulty(self, items):
            batch = _orig(self, items)
            if not self.random_annotator:  # validation / prediction loaders
                return batch
            n = _count["n"]
            _count["n"] += 1
            if n == int(_batch):
                if _kind == "raise":
                    raise DataError(f"injected fault: slice {int(batch['index'][0])} of this shard is unreadable")
                if _kind == "nan":
                    batch["image"][0, 0, 0, 0] = float("nan")
                if _kind == "hang":
                    time.sleep(600)
            return batch

        core.SegDataset.__getitems__ = _faulty
