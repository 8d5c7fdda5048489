"""The parts of a training run that :mod:`pyroseg.train` puts together.

* :mod:`pyroseg.training.step`: one SVI step (:class:`~pyroseg.training.step.Trainer`,
  :class:`~pyroseg.training.step.ELBOLoss`, :class:`~pyroseg.training.step.StepOutcome`);
* :mod:`pyroseg.training.objectives`: what the loop optimises, the plain ELBO or GECO,
  as one object the loop calls;
* :mod:`pyroseg.training.state`: where training stands (:class:`~pyroseg.training.state.Progress`),
  the epoch's loss sum and the resumable shuffle (:class:`~pyroseg.training.state.EpochSampler`).

The phases of a run and its handlers (best.pt, checkpoint.pt, metrics.csv,
pictures, the caller's callbacks) are in :mod:`pyroseg.train`, whose docstring
is the map; import the public names from there.
"""
