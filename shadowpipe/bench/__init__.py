"""Benchmarks and synthetic data, apart from the product so that nothing in it pays for them.

One module per ``shadowpipe bench NAME`` (:mod:`.emit`, :mod:`.shadow`, :mod:`.join`,
:mod:`.monitor`, :mod:`.verdict`), each with ``add_arguments(parser)`` and a ``func`` it
sets as the parser's default; the CLI names them in ``shadowpipe.cli.BENCHES`` and imports
one only when it is run. :mod:`.synthetic` generates the seeded JoinedRecord streams the
monitor's benchmark and tests feed in. Every benchmark prints one JSON object and measures
against a baseline in the same run.

Nothing under ``producers/``, ``processors/``, ``schemas/`` or the other ``shadowpipe``
modules imports this package. What only benchmarks import (numpy, scikit-learn, joblib,
matplotlib) comes with the ``bench`` extra: ``pip install 'shadowpipe[bench]'``.

>>> from shadowpipe.bench import synthetic
>>> len(synthetic.stream(synthetic.Spec(requests=3, seed=1)))
6
"""
