"""pyroseg's benchmark suite: ``python -m benchmarks.run`` (see :mod:`benchmarks.run`).

Not part of the default test run (``tests/test_benchmarks.py`` runs its
``--quick`` mode as a smoke test). Items, one module each: ``overhead`` (Pyro
vs hand-written PyTorch), ``throughput`` (images/s and peak memory per model),
``sampling`` (cost of ``sample(image, n)``), ``data`` (loading and data wait),
``scaling`` (epoch time vs slices and image size), ``options`` (each speed
option of the library on vs off).
"""
