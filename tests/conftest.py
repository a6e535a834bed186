"""Shared set-up of the test suite: the repository root, and the ``slow`` marker.

A test is marked ``slow`` when it, or a fixture it uses, trains a detector or starts a process
(a tool, ``train_net.py``, a second rank), or when the test itself profiles a detector's latency
(a profile times every layer many times over; a module's shared profile fixture is paid once and
stays in the fast tier): ``make test`` runs everything, ``make test-fast`` (``pytest -m "not slow"``)
the rest. The marker is found from the source, so a new test that
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

# what is slow in a test's own code but shared, and paid once, when a fixture does it
_SLOW_IN_TEST = re.compile(r"\bprofile_latency\(")


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
    if any(_SLOW_IN_TEST.search(source) for source in sources):
        return True
    for definitions in getattr(item, "_fixtureinfo").name2fixturedefs.values():
        for definition in definitions:
            sources += _with_helpers(_source(definition.func), inspect.getmodule(definition.func))
    return any(_SLOW.search(source) for source in sources)


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # `make test` runs one worker per core: each worker, and every process its tests start
        # (they inherit the variable), computes on its share of the cores instead of all of them
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))
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
