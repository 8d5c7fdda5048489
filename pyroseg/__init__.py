"""pyroseg: generative (probabilistic) medical image segmentation with Pyro.

The public API:

* :func:`pyroseg.train.fit` trains a model from a :class:`~pyroseg.config.FitConfig`;
* :func:`pyroseg.evaluate.evaluate_run` scores a run on held-out patients;
* :func:`pyroseg.sampling.sample_images` draws masks for images on disk;
* :mod:`pyroseg.models` holds the model/guide pairs (``build_model``, ``MODELS``);
* :mod:`pyroseg.data` loads the LGG layout and the synthetic sources;
* :mod:`pyroseg.metrics` has the metrics as pure tensor functions.
"""

__version__ = "0.1.0"
