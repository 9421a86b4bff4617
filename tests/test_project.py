"""Project wiring: environment.yml mirrors pyproject, the layout is as the README says."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_pins_every_dependency_within_pyproject_bounds_and_environment_yml_uses_it():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{name} is not pinned in requirements.lock (make lock)"
        assert req.specifier.contains(pins[name].split("+")[0], prereleases=True), (text, pins[name])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "flaresweep"
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-r requirements.lock", "-e . --no-deps"]


def test_the_installed_versions_are_the_locked_ones():
    from orchestrator.provenance import lock_mismatches, package_versions

    assert lock_mismatches(package_versions()) == {"file": "requirements.lock", "matches": True,
                                                  "differs": {}}


def test_layout():
    for path in ("sweep.py", "search_spaces", "cascade", "orchestrator", "reports", "results/README.md",
                 "tests", "requirements.lock",
                 "bench", "Makefile", "environment.yml", "pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / path).exists(), path


def test_make_help_lists_the_readme_commands():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target in ("sweep", "table1", "status", "test", "test-fast", "bench", "horovod", "lock",
                   "gpu-check"):
        assert re.search(rf"^  make {target}\s+\S", out, re.M), target


def test_only_sweep_imports_ray():
    """STYLE rule 1: cascade/ and reports/ run without Ray; sweep.py is the only Ray layer."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for pkg in ("cascade", "orchestrator", "reports")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name != "__main__.py" and not p.name.startswith("tune_")
    )
    assert "cascade.train" in modules and "reports.table1" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_status_and_table1_run_without_importing_torch(tmp_path):
    """`make status` / `make table1` read JSON and CSV: importing torch would cost seconds each."""
    code = (
        "import sys\nfrom pathlib import Path\nimport sweep\n"
        f"lines = sweep.status(Path('search_spaces/demo.yaml'), Path({str(tmp_path)!r}))\n"
        "assert 'nothing run yet' in lines[0], lines\n"
        "import reports.collect, reports.figures, reports.stats, reports.table1\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -- the import graph -----------------------------------------------------------------------------
PACKAGES = ("cascade", "orchestrator", "reports")


def _project_modules() -> dict[str, Path]:
    """Module name -> file, for the project's packages and sweep.py (a package is its __init__)."""
    modules = {"sweep": ROOT / "sweep.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (function-level imports
    too: a lazy import that closes a circle is still a circle). `from pkg import name` is an
    edge to `pkg.name` when that is a module, else to `pkg`; importing a submodule also runs its
    package's __init__, so every module imports its parent packages."""
    import ast

    modules = _project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the module and the packages above it
                    name = ".".join(parts[:i])
                    if name in modules and name != module and not module.startswith(name + "."):
                        graph[module].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_project_imports_form_a_tree_lazy_imports_included():
    graph = import_graph()
    assert len(graph) > 50 and "cascade.config" in graph["cascade.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    # Negative control: the graph as it is plus one upward lazy import (config -> encoders, the
    # edge this project once had) must be reported.
    graph = import_graph()
    graph["cascade.config"].add("cascade.encoders")
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "cascade.config" in cycle
