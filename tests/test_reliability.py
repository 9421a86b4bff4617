"""Reliability of the whole pipeline with the REAL train(): kill -9 and resume, atomic checkpoints,
and bad input refused up front through the command lines (issue 11).

Complements tests/test_sweep.py (fake train: failure containment, SIGINT, retries, unreachable
Ray) and tests/test_train.py (bit-identical resume in-process). Here every sweep is a real
`python sweep.py run` subprocess on a tiny space (a 32 px crop, an 8-channel Uformer, 8 steps),
so what is proven is the user's promise: kill it anywhere, run the same command again, and the
table equals the one of an uninterrupted run, with finished trials untouched.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SPACE = """\
# Reliability tests: a tiny grid (two cells and the reference) trained for real.
name: tiny
grid:
  k: [1, 2]
  lambda_: [0.5]
fixed:
  encoder: small_cpu
  encoder_pretrained: false
  embed_dim: 8
  depth: 1
  base_steps: 10
  crop: 32
  batch_size: 2
  steps: 8
  n_test: 2
  test_size: 64
  num_workers: 0
  eval_workers: 1
  n_samples: 1
  device: cpu
  log_every: 2
  checkpoint_every: 2
  base_cache: {cache}
reference: true
control: false
seeds: [0]
resources: {{cpu: 1, gpu: 0}}
max_concurrent: 2
max_failures: 1
"""
METRICS = ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak", "ssim_glare")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RAY_ADDRESS", "FLARESWEEP_TRAIN_FN", "FLARESWEEP_PREPARE"):
        env.pop(key, None)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _sweep_cmd(space: Path, results: Path) -> list[str]:
    return [sys.executable, "sweep.py", "run", "--space", str(space), "--results", str(results),
            "--cpus", "2"]


def _table(space: Path, results: Path):
    import pandas as pd

    done = _cli("sweep.py", "table1", "--space", str(space), "--results", str(results))
    assert done.returncode == 0, done.stderr
    df = pd.read_csv(results / "tiny" / "masked" / "table1.csv")
    keys = [c for c in ("method", "k", "lambda_") if c in df.columns]
    return df.sort_values(keys).reset_index(drop=True)[keys + [c for c in METRICS if c in df.columns]]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    (root / "tiny.yaml").write_text(SPACE.format(cache=root / "cache"))
    return root


@pytest.fixture(scope="module")
def uninterrupted(work):
    """Table 1 of one uninterrupted run (also builds the shared base in work/cache)."""
    results = work / "straight"
    done = subprocess.run(_sweep_cmd(work / "tiny.yaml", results), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return _table(work / "tiny.yaml", results)


# -- 1. SIGKILL the driver, run again ---------------------------------------------------------


def _trials(results: Path) -> Path:
    return results / "tiny" / "trials"


def _run_until(cmd: list[str], condition, timeout: float = 600) -> bool:
    """Run `cmd` in its own process group; SIGKILL the whole group once `condition()` holds.

    True when it was killed, False when it finished first.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                return False
            if condition():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.05)
        raise AssertionError(f"{cmd} neither finished nor reached the kill point in {timeout}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_of_the_driver_loses_nothing_and_the_table_is_unchanged(work, uninterrupted):
    space, results = work / "tiny.yaml", work / "killed"
    cmd = _sweep_cmd(space, results)

    def checkpoint_but_nothing_done() -> bool:
        trials = _trials(results)  # the reference trial trains nothing and may finish first
        return (any(trials.glob("k*/checkpoints/last.pt"))
                and not any(trials.glob("k*/evals/*/metrics.json")))

    # Kill point 1: a training trial has a checkpoint, none has finished.
    assert _run_until(cmd, checkpoint_but_nothing_done), "the sweep finished before the first kill"
    interrupted = {p.parent.parent.name for p in _trials(results).glob("k*/checkpoints/last.pt")}
    assert interrupted and not list(_trials(results).glob("k*/evals/*/metrics.json"))

    # Kill point 2: one training trial finished, the last one is still running (the Ray processes
    # of the killed run are orphans by now).
    def one_done() -> bool:
        return len(list(_trials(results).glob("k*/evals/*/metrics.json"))) == 1

    assert _run_until(cmd, one_done), "the sweep finished before the second kill"
    finished = {p.parents[2].name: (_digest(p), p.stat().st_mtime_ns,
                                    _digest(p.parents[2] / "train.log"), p.parent.name)
                for p in _trials(results).glob("*/evals/*/metrics.json")}
    assert finished

    # Run to the end; then nothing that finished before was touched or trained again.
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for tid, (digest, mtime, log, eval_id) in finished.items():
        tdir, metrics = _trials(results) / tid, _trials(results) / tid / "evals" / eval_id / "metrics.json"
        assert (_digest(metrics), metrics.stat().st_mtime_ns,
                _digest(tdir / "train.log"), eval_id) == (digest, mtime, log, eval_id), f"{tid} was re-run"
    # The trial interrupted at kill point 1 continued from its checkpoint, not from step 0.
    for tid in interrupted:
        log = (_trials(results) / tid / "train.log").read_text()
        assert "resuming from" in log and "at step 0/" not in log, log[-2000:]

    import pandas as pd

    pd.testing.assert_frame_equal(_table(space, results), uninterrupted, check_exact=True)


# -- 1b. A new protocol on a finished sweep: evaluated again, nothing trained ------------------------


def test_a_new_protocol_reevaluates_finished_trials_without_a_training_step(work, uninterrupted):
    import shutil

    import pandas as pd

    space, results = work / "tiny.yaml", work / "reevaluated"
    shutil.copytree(work / "straight", results)  # a finished sweep
    masked = (results / "tiny" / "masked" / "table1.csv").read_text()
    checkpoints = {p: (p.stat().st_mtime_ns, _digest(p)) for p in _trials(results).glob("*/checkpoints/last.pt")}
    logs = {p: p.read_text() for p in _trials(results).glob("*/train.log")}
    assert checkpoints and logs
    done = subprocess.run([*_sweep_cmd(space, results), "--protocol", "flare7k"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for path, (mtime, digest) in checkpoints.items():
        assert (path.stat().st_mtime_ns, _digest(path)) == (mtime, digest), f"{path} was rewritten"
    for path, before in logs.items():
        added = path.read_text()[len(before):]
        if path.parent.name.startswith("k"):  # a cascade trial: resumed at its last step, no step run
            assert "resuming from" in added and "at step 8/8" in added, added[-2000:]
            assert "step 1/8" not in added and "step 2/8" not in added, added[-2000:]
    for trial in _trials(results).iterdir():
        assert len(list(trial.glob("evals/*/metrics.json"))) == 2  # masked and flare7k, side by side
    table = _cli("sweep.py", "table1", "--space", str(space), "--results", str(results),
                 "--protocol", "flare7k")
    assert table.returncode == 0, table.stderr
    flare7k = pd.read_csv(results / "tiny" / "flare7k" / "table1.csv")
    assert (flare7k["protocol"] == "flare7k").all()
    assert (results / "tiny" / "masked" / "table1.csv").read_text() == masked


# -- 2. SIGKILL a trial's worker process --------------------------------------------------------


def test_sigkill_of_a_trial_worker_is_retried_from_its_checkpoint(work, uninterrupted):
    """max_failures: 1 in the space: Ray restarts the trial, train() resumes from last.pt."""
    from cascade.io import read_json

    space, results = work / "tiny.yaml", work / "worker-killed"
    proc = subprocess.Popen(_sweep_cmd(space, results), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    victim = None
    try:
        deadline = time.time() + 600
        while victim is None and proc.poll() is None and time.time() < deadline:
            for ckpt in _trials(results).glob("k*/checkpoints/last.pt"):
                tdir = ckpt.parent.parent
                try:
                    progress = read_json(tdir / "progress.json")
                except (OSError, ValueError):
                    continue
                if not any(tdir.glob("evals/*/metrics.json")) and progress.get("pid"):
                    try:
                        os.kill(progress["pid"], signal.SIGKILL)
                    except ProcessLookupError:  # it finished in between
                        continue
                    victim = tdir
                    break
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert victim is not None, "no trial was caught mid-training"
    assert proc.returncode == 0, output[-3000:]
    assert f"retry   {victim.name}" in output, output[-3000:]
    log = (victim / "train.log").read_text()
    assert "resuming from" in log, log[-2000:]

    import pandas as pd

    pd.testing.assert_frame_equal(_table(space, results), uninterrupted, check_exact=True)


# -- 3. SIGKILL inside a checkpoint write ------------------------------------------------------

_DIE_IN_SAVE = """\
import os, signal, sys
import torch
from cascade import checkpoint as ckpt

model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
folder = sys.argv[1]
ckpt.save_training_checkpoint(folder, step=4, model=model, optimizer=opt, scheduler=None,
                              config={"seed": 0})
real_save = torch.save

def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    with open(f, "r+b") as fh:  # a partial write: half the bytes, then the process dies
        fh.truncate(os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
with torch.no_grad():
    model.weight.add_(1.0)
ckpt.save_training_checkpoint(folder, step=6, model=model, optimizer=opt, scheduler=None,
                              config={"seed": 0})
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    import torch

    from cascade import checkpoint as ckpt

    done = _cli("-c", _DIE_IN_SAVE, str(tmp_path))
    assert done.returncode == -signal.SIGKILL, done.stderr
    state = ckpt.load_training_checkpoint(tmp_path)
    assert state is not None and state["step"] == 4
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ckpt.restore_training_state(state, model=model, optimizer=opt, scheduler=None) == 4
    # Only last.pt (and config.json) count: the half-written temporary is never read as one.
    assert ckpt.checkpoint_path(tmp_path).is_file()


# -- 5. bad input: one line, exit != 0, no traceback, nothing in results/ -----------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Test sets and checkpoints, good and broken, shared by the battery."""
    import shutil

    import torch

    from cascade.data.synthetic import generate_dataset
    from cascade.uformer import Uformer, save_checkpoint

    root = tmp_path_factory.mktemp("inputs")
    good = generate_dataset(root / "good", n=2, size=64, seed=0)
    (root / "empty" / "input").mkdir(parents=True)
    (root / "empty" / "gt").mkdir()
    (root / "empty" / "mask").mkdir()
    shutil.copytree(good, root / "unmatched")
    first_gt = sorted((root / "unmatched" / "gt").iterdir())[0]
    first_gt.rename(first_gt.with_name("zzz_" + first_gt.name))
    shutil.copytree(good, root / "corrupt")
    victim = sorted((root / "corrupt" / "input").iterdir())[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    torch.save({"params": {"foo.weight": torch.zeros(2, 2)}}, root / "not_uformer.pth")
    small = dict(embed_dim=8, depths=(1,) * 9, img_size=64)
    save_checkpoint(Uformer(output_ch=4, **small), root / "output_ch4.pth")
    save_checkpoint(Uformer(output_ch=3, **small), root / "output_ch3.pth")
    (root / "a_file").write_text("not a folder")
    return root


def _space_variant(tmp: Path, old: str, new: str) -> Path:
    text = SPACE.format(cache=tmp / "cache")
    assert old in text
    path = tmp / "space.yaml"
    path.write_text(text.replace(old, new))
    return path


# (id, what to replace in the space, extra command-line args, the word(s) the error must name)
KIND_PP = ("  crop: 32", "  crop: 32\n  base_kind: flare7kpp")
BAD_RUNS = [
    ("missing-test-data", None, ["--test-data", "{inputs}/nowhere"], "nowhere"),
    ("empty-test-data", None, ["--test-data", "{inputs}/empty"], "empty"),
    ("unmatched-stems", None, ["--test-data", "{inputs}/unmatched"], "unmatched"),
    ("corrupt-image", None, ["--test-data", "{inputs}/corrupt"], "corrupt"),
    ("missing-data", None, ["--data", "{inputs}/nowhere"], "nowhere"),
    ("not-a-uformer", KIND_PP, ["--checkpoint", "{inputs}/not_uformer.pth"], "not_uformer.pth"),
    ("wrong-output-ch", KIND_PP, ["--checkpoint", "{inputs}/output_ch4.pth"], "output_ch4.pth"),
    # A checkpoint cannot say which release it is (both have 6 channels): base_kind is required,
    # and flare7kpp needs the flare channels.
    ("base-kind-missing", None, ["--checkpoint", "{inputs}/output_ch3.pth"],
     ("base_kind", "output_ch3.pth")),
    ("flare7kpp-without-flare-channels", KIND_PP, ["--checkpoint", "{inputs}/output_ch3.pth"],
     ("base_kind=flare7kpp", "output_ch3.pth")),
    ("flare7k-without-checkpoint", ("  crop: 32", "  crop: 32\n  base_kind: flare7k"), [], "base_kind"),
    ("missing-lpips-weights", ("  crop: 32", "  crop: 32\n  lpips_weights: /nowhere/alexnet.pth"), [],
     ("lpips_weights", "/nowhere/alexnet.pth")),
    ("unknown-eval-mode", ("  crop: 32", "  crop: 32\n  eval_mode: large"), [], "eval_mode"),
    ("unknown-key", ("  crop: 32", "  crops: 32"), [], "crops"),
    ("lambda-out-of-range", ("lambda_: [0.5]", "lambda_: [1.5]"), [], "lambda_"),
    ("k-not-1-or-2", ("k: [1, 2]", "k: [1, 3]"), [], "k"),
    ("empty-grid", ("  k: [1, 2]\n  lambda_: [0.5]\n", ""), [], "grid"),
    ("storage-not-writable", None, ["--storage", "{inputs}/a_file/ray"], "a_file"),
]


@pytest.mark.parametrize("case", BAD_RUNS, ids=[c[0] for c in BAD_RUNS])
def test_bad_input_is_one_line_and_leaves_no_results(case, inputs, tmp_path):
    _, change, extra, culprit = case
    space = _space_variant(tmp_path, *change) if change else _space_variant(tmp_path, "", "")
    results = tmp_path / "results"
    results.mkdir()
    args = [a.format(inputs=inputs) for a in extra]
    done = _cli("sweep.py", "run", "--space", str(space), "--results", str(results), *args,
                timeout=300)
    _assert_one_line_error(done, culprit)
    assert sorted(results.rglob("*")) == [], "partial results were written"


def test_unanswering_ray_address_fails_fast_in_one_line(tmp_path):
    space = _space_variant(tmp_path, "", "")
    results = tmp_path / "results"
    results.mkdir()
    env = {**_env(), "RAY_ADDRESS": "127.0.0.1:1"}
    start = time.time()
    done = _cli("sweep.py", "run", "--space", str(space), "--results", str(results),
                "--connect-timeout", "3", env=env, timeout=120)
    assert time.time() - start < 90
    _assert_one_line_error(done, "127.0.0.1:1")
    assert sorted(results.rglob("*")) == []


def test_table1_before_any_sweep_is_one_line(tmp_path):
    space = _space_variant(tmp_path, "", "")
    results = tmp_path / "results"
    results.mkdir()
    done = _cli("sweep.py", "table1", "--space", str(space), "--results", str(results), timeout=120)
    _assert_one_line_error(done, "tiny")
    assert sorted(results.rglob("*")) == []


@pytest.mark.parametrize("which", ["corrupt", "unmatched"])
def test_evaluate_cli_refuses_a_broken_folder_in_one_line(which, inputs, tmp_path):
    folder = inputs / which
    done = _cli("-m", "cascade.evaluate", "--input", str(folder / "input"), "--gt", str(folder / "gt"),
                "--mask", str(folder / "mask"), "--no-progress", timeout=120)
    _assert_one_line_error(done, which)


def test_train_cli_refuses_a_foreign_checkpoint_in_one_line(inputs, tmp_path):
    cfg = tmp_path / "trial.yaml"
    cfg.write_text(f"kind: reference\ncheckpoint: {inputs / 'not_uformer.pth'}\nbase_kind: flare7kpp\n"
                   f"test_data: {inputs / 'good'}\ndevice: cpu\n")
    out = tmp_path / "out"
    done = _cli("-m", "cascade.train", "--config", str(cfg), "--output-dir", str(out), timeout=120)
    _assert_one_line_error(done, "not_uformer.pth")


@pytest.mark.parametrize(("base_kind", "culprits"), [
    (None, ("base_kind", "output_ch3.pth")),
    ("flare7kpp", ("base_kind=flare7kpp", "output_ch3.pth")),
])
def test_train_cli_refuses_a_base_kind_the_checkpoint_contradicts(inputs, tmp_path, base_kind, culprits):
    cfg = tmp_path / "trial.yaml"
    cfg.write_text(f"kind: reference\ncheckpoint: {inputs / 'output_ch3.pth'}\n"
                   + (f"base_kind: {base_kind}\n" if base_kind else "")
                   + f"test_data: {inputs / 'good'}\ndevice: cpu\n")
    out = tmp_path / "out"
    done = _cli("-m", "cascade.train", "--config", str(cfg), "--output-dir", str(out), timeout=120)
    _assert_one_line_error(done, culprits)
    assert not out.exists(), "the trial wrote before refusing"


def _assert_one_line_error(done: subprocess.CompletedProcess, culprit: str | tuple[str, ...]) -> None:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr[-2000:]
    for word in (culprit,) if isinstance(culprit, str) else culprit:
        assert word in lines[0], lines[0]
