"""Shared set-up of the test suite: the repository root, and the ``slow`` marker.

A test is marked ``slow`` when it, or a fixture it uses, trains a detector or starts a process
(a tool, ``train_net.py``, a second rank): ``make test`` runs everything, ``make test-fast``
(``pytest -m "not slow"``) the rest. The marker is found from the source, so a new test that
trains is marked without anyone remembering to.
"""
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what starts a process or trains: subprocess calls, the tools' entry points, detectron2 trainers
_SLOW = re.compile(r"subprocess\.|Popen\(|(?<![\w.])train\(|\bTrainer\(|trainer\.train\(\)|\brun_cli\(|_deterministic_run\(|"
                   r"\blaunch\(|\.main\(\[|\bsweep\.|\bprune_once\(")


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _with_helpers(source: str, module) -> list:
    """``source`` and that of the functions of ``module`` it calls (one level down)."""
    helpers = []
    for name in set(re.findall(r"\b(\w+)\(", source)):
        function = getattr(module, name, None)
        if inspect.isfunction(function) and function.__module__ == getattr(module, "__name__", None):
            helpers.append(_source(function))
    return [source] + helpers


def _trains_or_spawns(item) -> bool:
    module = getattr(item, "module", None)
    sources = _with_helpers(_source(getattr(item, "function", None)), module)
    for definitions in getattr(item, "_fixtureinfo").name2fixturedefs.values():
        for definition in definitions:
            sources += _with_helpers(_source(definition.func), inspect.getmodule(definition.func))
    return any(_SLOW.search(source) for source in sources)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: trains a detector or starts a process (make test-fast leaves these out)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _trains_or_spawns(item):
            item.add_marker(pytest.mark.slow)


def load_tool(name: str):
    """The module of ``tools/<name>.py``, to call its ``main(argv)`` in this process: the tests of
    a tool's command line (its arguments, its one-line errors, its exit codes). What a tool
    computes is tested through the library function it calls."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
