"""Each benchmark still runs (tiny sizes; not timed). The numbers live in docs/performance.md."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> (tiny arguments, a regex its side-by-side result line must match)
TINY = {
    # naive vs ours per protocol (the script itself exits non-zero if any value differs)
    "bench_metrics.py": (["--n", "4", "--size", "64"], r"(?m)^flare7k\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+x"),
    # synthesis vs training rate
    "bench_data.py": (["--sizes", "32", "--repeats", "1"], r"(?m)^cpu\s+32 \|.*\|\s+[\d.]+x$"),
    # cascade vs plain step
    "bench_step.py": (["--size", "32", "--embed-dim", "8", "--depth", "1", "--encoders", "none",
                       "--repeats", "1"], r"(?m)^none\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+"),
    # serial vs Ray Tune over the same 3 trials (the script exits non-zero if a trial is left)
    "bench_sweep.py": (["--grid", "k=1", "--grid", "lambda_=1.0,0.0", "--set", "base_steps=2",
                        "--set", "steps=2", "--set", "n_test=2", "--set", "test_size=32",
                        "--set", "crop=32", "--set", "checkpoint_every=1", "--set", "base_cache={tmp}"],
                       r"(?m)^ray \d+ at once\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+"
                       r"\s+[\d.]+\s+[\d.e+-]+\s+[\d.]+x$"),
}


def test_every_bench_script_has_a_tiny_configuration():
    assert sorted(p.name for p in (ROOT / "bench").glob("bench_*.py")) == sorted(TINY)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_bench_runs_tiny(script, tmp_path):
    args, result_line = TINY[script]
    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(result_line, proc.stdout), proc.stdout[-2000:]
