"""Each benchmark still runs (tiny sizes; not timed). The numbers live in docs/performance.md."""

import json
import math
import os
import re
import subprocess
import sys
import time
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
    # coverage of diff.csv's interval at true Δ = 0 (tiny: 20 cells per design, a 5-test family)
    "bench_coverage.py": (["--reps", "20", "--seeds", "1", "3", "--images", "16", "--resamples", "50",
                           "--family", "5", "--family-reps", "5"],
                          r"(?m)^    3     16    0\.30   0\.50   0\.25 \| [01]\.\d{3} [01]\.\d{3} \|"
                          r"[\s\S]*^family: 5 null comparisons"),
    # stream cache off vs on: the paper's sweep counted at a toy size, then an 8-cell grid timed
    # (the script exits non-zero if any cell's results differ between the two sides)
    "bench_stream_cache.py": (["--set", "crop=32", "--set", "batch_size=2", "--set", "steps=3",
                               "--set", "encoder=timm:test_vit", "--embed-dim", "8", "--depth", "1",
                               "--eval-size", "32", "--n-eval", "2", "--steps", "3", "--crop", "32",
                               "--batch", "2", "--encoder", "timm:test_vit", "--flare-side", "256",
                               "--fake-flares", "2", "--base-steps", "2", "--n-test", "2",
                               "--test-size", "32", "--workdir", "{tmp}"],
                              r"(?m)^flops sweep: off [\d.e+-]+ TFLOP, on [\d.e+-]+ TFLOP, on/off "
                              r"0\.\d+x \(12 cells\)$[\s\S]*^time grid: off [\d.]+ CPU-s, on [\d.]+ "
                              r"CPU-s, on/off [\d.]+x \(8 cells, results identical\)$"),
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


def test_gpu_check_without_cuda_exits_at_once_with_one_line(tmp_path):
    """No CUDA device (hidden here even on a GPU machine): one line on stderr, exit 3, seconds."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert re.fullmatch(r"gpu_check: error: no CUDA device: torch \S+ .*nothing measured; "
                        r"log \S+/env\.log\n", proc.stderr), proc.stderr
    assert elapsed < 60  # an import and a check, never a hang
    assert not (tmp_path / "out" / "sections.csv").exists()  # no section ran


# section -> (extra arguments, regex of its result line) of bench/gpu_check.py --dry-run
GPU_CHECK_DRY = {
    "step": (["--precisions", "fp32"],
             r"(?m)^gpu_check step: 1/1 configurations ok, 1 rows -> \S+/step\.json$"),
    "data": ([], r"(?m)^gpu_check data: flare7k synthesis on cpu at 32 px \(from 64 px\): [\d.]+ "
                 r"pairs/s vs [\d.]+ pairs/s of a plain training step \([\d.]+x\), decoding "
                 r"[\d.]+ s/batch of 2 \([\d.]+ loader workers needed\); 2 comparisons with "
                 r"step\.json -> \S+/data\.json$"),
    "eval": ([], r"(?m)^gpu_check eval: 4 images 64 px: predict [\d.]+ s on cpu, metrics "
                 r"[\d.]+ s with 0 workers -> \S+/eval\.json$"),
}


@pytest.mark.slow
@pytest.mark.parametrize("section", sorted(GPU_CHECK_DRY))
def test_gpu_check_dry_run(section, tmp_path):
    """Each GPU section's code path runs on the CPU at a toy size and records what it printed."""
    if section == "data":  # a cascade step of 0.5 s per batch of 2: 4 pairs/s to compare with
        (tmp_path / "step.json").write_text(json.dumps({"rows": [{
            "size": 32, "device": "cpu", "batch": 2, "cascade_wall": 0.5, "precision": "fp32",
            "encoder": "none"}]}))
    args, result_line = GPU_CHECK_DRY[section]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), section,
                           "--dry-run", "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(result_line, proc.stdout), proc.stdout[-2000:]
    result = json.loads((tmp_path / f"{section}.json").read_text())
    if section == "step":
        (row,) = result["rows"]
        assert (row["size"], row["batch"], row["encoder"], row["device"]) == (32, 1, "none", "cpu")
        assert row["ratio_wall"] == pytest.approx(row["cascade_wall"] / row["plain_wall"])
        assert row["peak_source"] == "none on the CPU" and math.isnan(row["cascade_mfu"])
        header = (tmp_path / "step.csv").read_text().splitlines()[0]
        assert header.startswith("size,batch,precision,compile,encoder,")
    elif section == "data":
        assert [r["source"] for r in result["rows"]] == ["flare7k", "procedural"]
        for row, vs in zip(result["rows"], result["vs_trainer"]):
            assert vs["step_pairs_per_s"] == pytest.approx(4.0)
            assert vs["ratio"] == pytest.approx(row["synth_pairs_per_s"] / 4.0)
            assert vs["synth_share"] == pytest.approx(4.0 / (4.0 + row["synth_pairs_per_s"]))
        assert result["rows"][0]["decode_s"] > 0 and result["rows"][1]["decode_s"] is None
    else:
        assert result["n"] == 4 and [m["n_images"] for m in result["metrics"]] == [4]


@pytest.mark.slow
def test_bench_sweep_scaling_runs_tiny(tmp_path):
    """bench_sweep.py --scaling (issue 21, item 3): ours vs bare Ray Tune at two tiny sizes, each
    side in its own process; the result line's difference is its two marginal costs'."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_sweep.py"), "--scaling",
                           "--sizes", "2", "4", "--trial-ms", "0", "--max-concurrent", "2",
                           "--cpu-per-trial", "1", "--cpus", "2", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = re.search(r"(?m)^scaling: ours - bare ([+-][\d.]+), ours - bare-s ([+-][\d.]+) s per "
                     r"trial \(2->4 trials; bare (-?[\d.]+), bare-s (-?[\d.]+), ours (-?[\d.]+)\); "
                     r"driver peak RSS at 4: bare \d+ MB, bare-s \d+ MB, ours \d+ MB$", proc.stdout)
    assert line, proc.stdout[-2000:]
    diff, diff_s, bare, bare_s, ours = (float(line.group(i)) for i in range(1, 6))
    assert diff == pytest.approx(ours - bare, abs=2e-3)
    assert diff_s == pytest.approx(ours - bare_s, abs=2e-3)
    rows = re.findall(r"(?m)^\s+([24]) (bare|bare-s|ours)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", proc.stdout)
    assert sorted((n, side) for n, side, *_ in rows) == [
        (n, side) for n in "24" for side in ("bare", "bare-s", "ours")]
    for n, _, wall, per_trial, _ in rows:  # wall / trial is the wall over the size
        assert float(per_trial) == pytest.approx(float(wall) / int(n), abs=0.05 / int(n) + 1e-3)
    assert (tmp_path / "ours-4" / "results" / "scaling-4" / "sweep.json").is_file()  # the real layout


@pytest.mark.slow
def test_bench_sweep_scaling_driver_only_runs_tiny(tmp_path):
    """bench_sweep.py --scaling --driver-only: the driver's share, replayed without Ray."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_sweep.py"), "--scaling",
                           "--driver-only", "--sizes", "3", "6", "12", "--max-concurrent", "2",
                           "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = re.search(r"(?m)^driver-only: (-?[\d.]+) ms per trial 3->6 trials, (-?[\d.]+) ms "
                     r"6->12 \((-?[\d.]+)x\); peak RSS \d+ -> \d+ MB$", proc.stdout)
    assert line, proc.stdout[-2000:]
    a, b, ratio = (float(line.group(i)) for i in (1, 2, 3))
    assert ratio == pytest.approx(b / a, rel=0.05, abs=0.01)
    # every replayed trial went through the real record: 12 metrics.json, the Board saw them done
    sweep_dir = tmp_path / "driver-12" / "results" / "scaling-12"
    assert len(list(sweep_dir.glob("trials/*/evals/*/metrics.json"))) == 12
    assert "12/12 done, 0 running" in (tmp_path / "driver-12" / "driver.log").read_text()


def _fake_demo_base(cache: Path, gap_psnr: float, gap_ssim: float) -> None:
    """A cached demo base (base.pth + base.json) whose second pass costs `gap_psnr` / `gap_ssim`,
    where bench/demo_check.py's demo config looks for it (its base key under `cache`)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import demo_check

    from cascade import pretrain

    folder = cache / "bases" / pretrain.base_key(demo_check.demo_config())
    folder.mkdir(parents=True)
    (folder / "base.pth").write_bytes(b"weights")
    scores = {"psnr_entire": 24.0, "ssim_entire": 0.7, "psnr_outside": 30.0, "ssim_outside": 0.78,
              "n_images": 96}
    second = scores | {"psnr_entire": 24.0 - gap_psnr, "ssim_entire": 0.7 - gap_ssim}
    identity = scores | {"psnr_entire": 11.74, "ssim_entire": 0.49, "ssim_outside": 0.73}
    quality = {"test_set": "t", "identity": identity, "base": scores, "deflares": True,
               "second_pass": second, **pretrain.second_pass_gap(scores, second)}
    (folder / "base.json").write_text(json.dumps({"train_s": 80.0, "quality": quality}))


@pytest.mark.parametrize(("gap_psnr", "gap_ssim", "code"), [
    (0.21, 0.004, 0), (0.35, 0.004, 1), (0.1, 0.006, 1), (-0.5, -0.01, 0)])
def test_demo_check_budget_prints_the_idempotence_gap_and_its_verdict(
        gap_psnr, gap_ssim, code, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLARESWEEP_CACHE", str(tmp_path))
    _fake_demo_base(tmp_path, gap_psnr, gap_ssim)
    import demo_check

    with pytest.raises(SystemExit) as exit_:
        demo_check.main(["budget"])
    assert exit_.value.code == code
    out = capsys.readouterr().out
    assert re.search(r"(?m)^  reference \(the base\)\s+PSNR  24\.00 dB, SSIM 0\.7000", out), out
    assert f"PSNR {24.0 - gap_psnr:6.2f} dB, SSIM {0.7 - gap_ssim:.4f}" in out
    verdict = "within the bounds" if code == 0 else "NOT within the bounds"
    assert (f"idempotence gap (reference - cascade at 0 steps): PSNR {gap_psnr:+.3f} dB (at most "
            f"0.3), SSIM {gap_ssim:+.4f} (at most 0.005): {verdict}\n") in out


def test_demo_check_readme_rows_are_the_table_and_diff_frame_values(tmp_path, monkeypatch):
    from test_collect import make_results_tree

    from reports.collect import load_sweep
    from reports.table1 import diff_frame, table1_frame

    monkeypatch.setenv("FLARESWEEP_CACHE", str(tmp_path / "cache"))
    _fake_demo_base(tmp_path / "cache", 0.1, 0.001)
    import demo_check

    sweep_dir = make_results_tree(tmp_path, seeds=(0, 1))
    lines = demo_check.readme_rows(sweep_dir)
    sweep = load_sweep(sweep_dir)
    table, diffs = table1_frame(sweep), diff_frame(sweep)
    assert lines[0].startswith("| 12 test images, seeds 0-1 |") and lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| identity (input as output) | 11.74 | 0.490 | | |"  # base.json's identity
    ref = table[table["method"] == "reference"].iloc[0]
    assert lines[3] == f"| reference (the base) | {ref['psnr_entire']:.2f} | {ref['ssim_entire']:.3f} |  |  |"
    # One row per cascade cell, the λ = 0 trial once; no control in this sweep: its column empty.
    assert len(lines) == 4 + 5 and sum("λ = 0 (k has no effect)" in line for line in lines) == 1
    row = diffs[(diffs["method"] == "cascade") & (diffs["k"] == 2) & (diffs["lambda_"] == 1.0)
                & (diffs["metric"] == "psnr_entire")].iloc[0]
    (line,) = [line for line in lines if line.startswith("| k=2, λ = 1 |")]
    assert line.endswith(f"| {row['diff']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] |  |")
