"""Run the runnable examples in every public module's docstrings."""

import doctest
import importlib
import pkgutil

import pytest

import shadowpipe
import shadowpipe.processors
import shadowpipe.producers
import shadowpipe.schemas


def _modules() -> list[str]:
    names = []
    for pkg in (shadowpipe, shadowpipe.producers, shadowpipe.processors, shadowpipe.schemas):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
