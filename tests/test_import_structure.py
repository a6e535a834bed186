"""The package's import structure, read from the source: no cycle between pgp_det modules, the
pruning core and the utilities depend on nothing above them, the latency table stands on the
channel groups and the utilities alone, the config module is a leaf, and importing it registers
no dataset."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "pgp_det"
TOOLS = {name[:-3] for name in os.listdir(os.path.join(ROOT, "tools")) if name.endswith(".py")}
# what the pruning core and the utilities must not import: the layers built on top of them (the
# latency profiler, pgp_det.benchmark.latency, among them)
ABOVE_THE_CORE = ("pgp_det.benchmark", "pgp_det.engine", "pgp_det.export", "pgp_det.evaluation", "pgp_det.checkpoint")
# the latency table's modules: the pruning core's latency target reads tables, so they may import
# only the errors and the utilities (BELOW_THE_LATENCY_TABLE) and each other
LATENCY_TABLE = tuple(f"pgp_det.latency{m}" for m in ("", ".table", ".schema", ".io", ".fit", ".merge", ".page_faults"))
BELOW_THE_LATENCY_TABLE = ("pgp_det.errors", "pgp_det.utils")
# what the latency profiler's stages stand on (the tool's work, pgp_det.engine.profile_command, builds
# configs and loads checkpoints besides)
BELOW_THE_PROFILER = ("pgp_det.errors", "pgp_det.utils", "pgp_det.pruning", "pgp_det.benchmark.timing",
                      "pgp_det.benchmark.latency", "pgp_det.latency")


def package_modules() -> dict:
    """``{module name: file path}`` of every module of the package."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: str, modules) -> dict:
    """``{imported module: line}`` for every import in the module ``name`` (those inside functions
    included): pgp_det modules as the exact module named (``from .a import b`` is ``a.b`` when
    that is a module, else ``a``), other imports by their top-level name."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.setdefault(target if target in modules else base, node.lineno)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _cycle(graph) -> list:
    """One import cycle among pgp_det modules, as a list of modules, or []."""
    edges = {m: [t for t in targets if t in graph and t != m] for m, targets in graph.items()}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in edges[module]:
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = "done"
        return []

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def test_walker_reads_relative_and_lazy_imports(graph):
    assert "pgp_det.errors" in graph["pgp_det.config"]
    assert "pgp_det.pruning.settings" in graph["pgp_det.engine.preflight"]
    assert "pgp_det.pruning.cost" in graph["pgp_det.pruning.hook"]  # imported inside a method
    assert "pgp_det.utils.modules" in graph["pgp_det.utils.flops"]
    assert "pgp_det.latency.table" in graph["pgp_det.pruning.target"]


def test_no_import_cycle_between_package_modules(graph):
    assert _cycle(graph) == []
    assert _cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]  # the check itself


@pytest.mark.parametrize("layer", ["pgp_det.pruning", "pgp_det.utils"])
def test_core_imports_nothing_above_it(graph, layer):
    offending = []
    for module, targets in graph.items():
        if module != layer and not module.startswith(layer + "."):
            continue
        for target, line in targets.items():
            above = any(target == a or target.startswith(a + ".") for a in ABOVE_THE_CORE)
            if above or target.split(".")[0] in TOOLS:
                offending.append(f"{module} line {line} imports {target}")
    assert offending == []


def test_latency_table_stands_on_the_errors_and_the_utilities(graph):
    """The table, its files, fit and merge import nothing of the profiler, the pruning core or the
    layers above it: the pruning target reads tables without loading what measures them, and
    the two never import each other in a circle."""
    assert all(module in graph for module in LATENCY_TABLE)  # the list names real modules
    offending = []
    for module in LATENCY_TABLE:
        for target, line in graph[module].items():
            ours = target == PACKAGE or target.startswith(PACKAGE + ".")
            below = any(target == b or target.startswith(b + ".") for b in BELOW_THE_LATENCY_TABLE)
            if ours and not below and target not in LATENCY_TABLE:
                offending.append(f"{module} line {line} imports {target}")
    assert offending == []


def test_latency_profiler_stands_on_the_pruning_core_and_the_timing(graph):
    """The profiler's stages import the pruning core, the timing helpers and the latency table,
    nothing of training, evaluation or export."""
    stages = [m for m in graph if m.startswith("pgp_det.benchmark.latency.")]
    assert "pgp_det.benchmark.latency.profile" in stages
    offending = []
    for module in stages:
        for target, line in graph[module].items():
            ours = target == PACKAGE or target.startswith(PACKAGE + ".")
            if ours and not any(target == b or target.startswith(b + ".") for b in BELOW_THE_PROFILER):
                offending.append(f"{module} line {line} imports {target}")
    assert offending == []


def test_config_is_a_leaf(graph):
    ours = {t for t in graph["pgp_det.config"] if t == PACKAGE or t.startswith(PACKAGE + ".")}
    assert ours == {"pgp_det.errors"}


def last_lines_printed(code: str, count: int) -> list:
    """The last ``count`` lines ``code`` prints in a fresh interpreter (the checkout first on the
    path); fails the test if it does not exit 0."""
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1])\n" + code, ROOT],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-count:]


def test_importing_the_config_registers_no_dataset():
    datasets, modules = last_lines_printed(
        "import pgp_det.config\n"
        "from detectron2.data import DatasetCatalog\n"
        "print(sorted(n for n in DatasetCatalog.list() if n.startswith('synth_')))\n"
        "print(sorted(m for m in sys.modules if m.startswith('pgp_det')))\n", 2)
    assert datasets == "[]"
    assert modules == str(["pgp_det", "pgp_det.config", "pgp_det.errors"])


# Imports the third-party modules named on stdin, then each package module given as an argument
# first, in a child forked for it: prints "<module> <exit code>" per module, a failure's last
# traceback line on stderr.
_IMPORT_EACH_FIRST = r"""
import importlib, os, sys, traceback
for name in sys.stdin.read().split():
    try:
        importlib.import_module(name)
    except Exception:
        pass
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            sys.stderr.write(module + ": " + traceback.format_exc().strip().splitlines()[-1] + "\n")
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    print(module, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_every_module_imports_first_in_a_fresh_process():
    """A cycle that only bites in one import order shows when each module is the package's first
    one imported. Each module is imported in a process forked for it from one interpreter that
    holds only the third-party modules the package loads (torch, detectron2, ...): importing
    those afresh for every module cost minutes and tests nothing of the package."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
    modules = sorted(package_modules())
    listing = subprocess.run(
        [sys.executable, "-c", "import contextlib, importlib, sys\n"
         f"for m in {modules!r}:\n"
         "    with contextlib.suppress(Exception): importlib.import_module(m)\n"
         "print(' '.join(m for m in sys.modules if m.split('.')[0] not in ('pgp_det', '__main__')))"],
        capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    third_party = listing.stdout.split()
    assert "torch" in third_party and "detectron2" in third_party
    assert not any(m.startswith("pgp_det") for m in third_party)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *modules], input=" ".join(third_party),
                          capture_output=True, text=True, cwd=ROOT, env=env)
    codes = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines())
    assert sorted(codes) == modules, proc.stderr[-2000:]
    failures = [m for m in modules if codes[m] != "0"]
    assert not failures, proc.stderr


def test_front_door_exports_the_main_pieces_without_loading_them():
    """``from pgp_det import add_pgp_config`` loads only the config module; every other exported
    name is the library's own object, imported when first asked for."""
    code = (
        "from pgp_det import add_pgp_config\n"
        "print(sorted(m for m in sys.modules if m.startswith('pgp_det')))\n"
        "import pgp_det, pgp_det.pruning.hook, pgp_det.pruning.criteria\n"
        "from pgp_det import PGPHook, CRITERION_REGISTRY\n"
        "from detectron2.engine import HookBase\n"
        "from detectron2.config import get_cfg\n"
        "print(PGPHook is pgp_det.pruning.hook.PGPHook, issubclass(PGPHook, HookBase),\n"
        "      CRITERION_REGISTRY is pgp_det.pruning.criteria.CRITERION_REGISTRY, 'pgp' in CRITERION_REGISTRY)\n"
        "print(add_pgp_config(get_cfg()).PRUNING.CRITERION.NAME)\n"
        "print(sorted(n for n in pgp_det.__all__ if getattr(pgp_det, n, None) is None))\n"
        "try:\n"
        "    from pgp_det import no_such_name\n"
        "except ImportError as e:\n"
        "    print('ImportError')\n"
    )
    modules, identities, criterion, missing, refused = last_lines_printed(code, 5)
    assert modules == str(["pgp_det", "pgp_det.config", "pgp_det.errors"])
    assert identities == "True True True True"
    assert criterion == "pgp"
    assert missing == "[]"
    assert refused == "ImportError"


def test_every_tool_reports_bad_input_through_the_one_wrapper():
    """Each tool's ``main`` hands its work to :func:`pgp_det.utils.cli.run_tool`, which prints any
    bad input as one line with exit code 2 (the installer and the lock check run before the
    package is installed, so they cannot import it)."""
    before_install = {"install_detectron2", "check_lock"}
    for name in sorted(TOOLS - before_install):
        with open(os.path.join(ROOT, "tools", f"{name}.py")) as f:
            tree = ast.parse(f.read())
        entries = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        main = entries.get("cli", entries.get("main"))  # train_net's main is detectron2's per-process worker
        calls = {node.func.id for node in ast.walk(main) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert "run_tool" in calls, name
