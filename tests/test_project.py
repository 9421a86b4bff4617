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
