"""reports.collect: a results tree (docs/design.md "Results on disk") -> DataFrames.

`make_results_tree` builds a small but realistic sweep folder; the other reports tests import it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cascade.errors import UserError
from orchestrator.record import LAYOUT, SweepRecord
from reports.collect import METRICS, load_sweep

REGIONS = ("entire", "streak", "glare")
EVAL = "masked-test"  # every cell's evaluation id in the hand-made tree
# Per-image offset of each metric from the reference: PSNR in dB, SSIM in SSIM units.
EFFECTS = {(1, 1.0): 0.10, (1, 0.6): -0.05, (2, 1.0): 0.30, (2, 0.6): -0.20, (None, 0.0): 0.0}


def _image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark scene with a bright blob, (size, size, 3) uint8."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = np.exp(-((yy - 0.4) ** 2 + (xx - 0.55) ** 2) / 0.02)[..., None]
    base = 0.15 + 0.1 * rng.random((size, size, 3))
    return (np.clip(base + blob * np.array([1.0, 0.7, 0.3]), 0, 1) * 255).astype(np.uint8)


def _mask(size: int) -> np.ndarray:
    """Flare7K colours: glare disc with a horizontal streak through it."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    mask = np.zeros((size, size, 3), np.uint8)
    mask[((yy - 0.4) ** 2 + (xx - 0.55) ** 2) < 0.04] = (255, 255, 0)
    mask[(np.abs(yy - 0.4) < 0.03) & (np.abs(xx - 0.55) < 0.4)] = (255, 0, 0)
    return mask


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_results_tree(root: Path, *, seeds: tuple[int, ...] = (0,), n_images: int = 12,
                      failed: tuple[tuple[int, float, int], ...] = ((1, 0.6, 0),),
                      pending: tuple[tuple[int, float, int], ...] = (),
                      real: bool = False, size: int = 32, noise: float = 0.05,
                      with_images: bool = True, fidelity: bool = False,
                      lpips_weights: bool = True) -> Path:
    """Write `root/results/demo` as sweep.py would; returns the sweep folder.

    Cells: a reference per seed, k in (1, 2) x λ in (1.0, 0.6, 0.0) per seed, the λ=0 cells of
    both k sharing one trial. Cells listed in `failed` get error.json, in `pending` nothing.
    Per-image values: reference ~ 23 dB / 0.87, each cell = reference + EFFECTS[cell] (+ noise).
    `real`: pretrained encoder, Flare7K-style data, test set and checkpoint paths (not a demo).
    `fidelity`: metrics.json records what train() records since issue 17 (loss conventions,
    d_pn, base kind, eval mode, LPIPS convention), with LPIPS rows and `lpips_entire` =
    FIDELITY_LPIPS(cell, seed) when `lpips_weights`, else lpips_entire null and a reason.
    """
    sweep = root / "results" / "demo"
    testset = root / "testset"
    rng = np.random.default_rng(0)
    stems = [f"{i:04d}" for i in range(n_images)]
    if with_images:
        for stem in stems[:4]:
            _write_png(testset / "input" / f"{stem}.png", _image(rng, size))
            _write_png(testset / "gt" / f"{stem}.png", _image(rng, size) // 2)
            _write_png(testset / "mask" / f"{stem}.png", _mask(size))
    base = {m: 23.0 + 7.0 * i if m.startswith("psnr") else 0.87 + 0.03 * (i - 3)
            for i, m in enumerate(METRICS)}
    ref_values = {(s, m): base[m] + rng.normal(0, 0.5 if m.startswith("psnr") else 0.01, n_images)
                  for s in seeds for m in METRICS}
    pretrained = real
    config = {"encoder": "resnet18", "encoder_pretrained": real,
              "data": "/data/Flare7Kpp" if real else None,
              "test_data": str(testset) if real else None,
              "checkpoint": "/ckpt/net_g_last.pth" if real else None, "protocol": "masked"}

    cells, trials = [], {}
    for s in seeds:
        cells.append({"trial_id": f"ref-s{s}", "eval_id": EVAL, "kind": "reference", "k": None, "lambda_": None,
                      "seed": s, "config": {**config, "kind": "reference", "seed": s}})
        trials[f"ref-s{s}"] = (None, s)
        for k in (1, 2):
            for lam in (1.0, 0.6, 0.0):
                tid = f"l0-s{s}" if lam == 0.0 else f"k{k}-l{lam}-s{s}"
                cells.append({"trial_id": tid, "eval_id": EVAL, "kind": "cascade", "k": k, "lambda_": lam, "seed": s,
                              "config": {**config, "kind": "cascade", "k": k, "lambda_": lam, "seed": s}})
                trials[tid] = ((None if lam == 0.0 else k), lam), s
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "demo", "space": "demo.yaml", "cells": cells,
                                                  "layout": LAYOUT}))

    for tid, (cell, s) in trials.items():
        out = result_dir(sweep, tid)
        out.mkdir(parents=True)
        key = cell if cell is not None else None
        if cell is not None and (cell[0] or 1, cell[1], s) in {(k, lam, ss) for k, lam, ss in failed}:
            (out.parents[1] / "error.json").write_text(json.dumps(
                {"error": "non-finite loss at step 3\nmore", "traceback": "...", "step": 3}))
            continue
        if cell is not None and (cell[0] or 1, cell[1], s) in set(pending):
            continue
        effect = 0.0 if key is None else EFFECTS[key]
        rows, summary = [], {}
        for m in METRICS:
            scale = 1.0 if m.startswith("psnr") else 0.01
            values = ref_values[(s, m)] + scale * (effect + rng.normal(0, noise, n_images) * (key is not None))
            summary[m] = float(values.mean())
            metric, region = m.split("_")
            rows += [{"image": f"{stem}.png", "region": region, "metric": metric, "value": v}
                     for stem, v in zip(stems, values)]
        pd.DataFrame(rows).to_csv(out / "per_image.csv", index=False)
        if fidelity:
            summary.update(_fidelity_facts(key, s, lpips_weights))
            if lpips_weights:
                rows += [{"image": f"{stem}.png", "region": "entire", "metric": "lpips",
                          "value": summary["lpips_entire"]} for stem in stems]
            pd.DataFrame(rows).to_csv(out / "per_image.csv", index=False)
        (out / "metrics.json").write_text(json.dumps({
            **summary, "n_images": n_images, "protocol": "masked", "trial_id": tid,
            "encoder": "resnet18", "encoder_pretrained": pretrained,
            "test_data_dir": str(testset), "steps": 10}))
        if with_images:
            for stem in stems[:3]:
                _write_png(out / "samples" / f"{stem}.png", _image(rng, size))
    return sweep


def fidelity_lpips(cell: tuple[int | None, float] | None, seed: int) -> float:
    """lpips_entire of a trial in a `fidelity` tree: the reference 0.25, cells lower by EFFECTS."""
    return 0.25 - (0.0 if cell is None else 0.1 * EFFECTS[cell]) + 0.002 * seed


def fidelity_d_pn(lambda_: float, seed: int) -> dict:
    """metrics.json's `d_pn` of a cascade trial in a `fidelity` tree (none when lambda_ = 1)."""
    if lambda_ == 1.0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "p5": None,
                "p50": None, "p95": None, "hinge_active": None}
    return {"count": 80, "mean": 0.5, "std": 0.1, "min": 0.2, "max": 0.9, "p5": 0.3,
            "p50": 0.4 + 0.1 * seed, "p95": 0.8, "hinge_active": 0.25 + 0.5 * seed}


def _fidelity_facts(cell: tuple[int | None, float] | None, seed: int, lpips_weights: bool) -> dict:
    cascade = cell is not None
    return {
        "reduction": "mean" if cascade else None, "encoder_features": "cls" if cascade else None,
        "random_erasing": 0.5 if cascade else None, "margin": 0.1 if cascade else None,
        "random_erasing_on": "input" if cascade else None,
        "d_pn": fidelity_d_pn(cell[1], seed) if cascade else None,
        "base_kind": "flare7kpp", "eval_mode": "native", "lpips": "flare7k",
        "lpips_entire": fidelity_lpips(cell, seed) if lpips_weights else None,
        "lpips_weights_source": "torchvision:AlexNet_Weights.IMAGENET1K_V1" if lpips_weights else None,
        "lpips_fingerprint": "0123456789abcdef" if lpips_weights else None,
        "lpips_reason": None if lpips_weights else "no AlexNet trunk weights offline (alexnet.pth)",
    }


def result_dir(sweep: Path, trial_id: str) -> Path:
    """Where a trial's evaluation EVAL lives in the tree (orchestrator.record's layout)."""
    return SweepRecord(sweep).eval_dir(trial_id, EVAL)


# -- tests ----------------------------------------------------------------------------------------
def test_cells_keep_every_plan_row_with_status(tmp_path):
    sweep = load_sweep(make_results_tree(tmp_path, with_images=False))
    cells = sweep.cells
    assert len(cells) == 7  # reference + 2 k x 3 λ, λ=0 listed under both k
    assert cells["status"].value_counts().to_dict() == {"done": 6, "failed": 1}
    failed = cells[cells["status"] == "failed"].iloc[0]
    assert (failed["k"], failed["lambda_"]) == (1, 0.6)
    assert failed["error"] == "non-finite loss at step 3"
    assert failed[list(METRICS)].isna().all()  # never 0


def test_lambda_zero_trial_is_shared_by_both_k(tmp_path):
    cells = load_sweep(make_results_tree(tmp_path, with_images=False)).cells
    zero = cells[cells["lambda_"] == 0.0]
    assert sorted(zero["k"]) == [1, 2]
    assert zero["trial_id"].nunique() == 1 and zero["shared"].all()
    assert not cells.loc[cells["lambda_"] == 1.0, "shared"].any()


def test_reference_has_no_k_or_lambda(tmp_path):
    cells = load_sweep(make_results_tree(tmp_path, with_images=False)).cells
    ref = cells[cells["kind"] == "reference"].iloc[0]
    assert pd.isna(ref["k"]) and pd.isna(ref["lambda_"])


def test_summary_and_per_image_agree(tmp_path):
    sweep = load_sweep(make_results_tree(tmp_path, with_images=False, n_images=5))
    per = sweep.per_image
    assert set(per["image"]) == {f"{i:04d}" for i in range(5)}  # stems, not file names
    ref = per[(per["trial_id"] == "ref-s0") & (per["metric"] == "psnr") & (per["region"] == "glare")]
    summary = sweep.cells.loc[sweep.cells["trial_id"] == "ref-s0", "psnr_glare"].iloc[0]
    assert ref["value"].mean() == pytest.approx(summary)


def test_facts_come_from_metrics_then_config(tmp_path):
    sweep = load_sweep(make_results_tree(tmp_path, with_images=False))
    facts = sweep.trials["k2-l1.0-s0"]
    assert facts["encoder"] == "resnet18" and facts["encoder_pretrained"] is False
    assert facts["data"] is None and facts["protocol"] == "masked"
    assert facts["test_data_dir"] == str(tmp_path / "testset")
    assert sweep.trials["k1-l0.6-s0"]["status"] == "failed"
    assert sweep.trials["k1-l0.6-s0"]["encoder"] == "resnet18"  # from the plan's config


def test_fidelity_facts_and_lpips_are_collected(tmp_path):
    from reports.collect import LPIPS_METRIC, describe_trials, distance_summary

    sweep = load_sweep(make_results_tree(tmp_path, seeds=(0, 1), with_images=False, fidelity=True))
    cells = sweep.cells
    ref = cells[cells["trial_id"] == "ref-s1"].iloc[0]
    assert ref[LPIPS_METRIC] == pytest.approx(0.252)
    facts = sweep.trials["k2-l0.6-s1"]
    assert (facts["reduction"], facts["encoder_features"], facts["random_erasing"], facts["margin"]) == (
        "mean", "cls", 0.5, 0.1)
    assert (facts["base_kind"], facts["eval_mode"], facts["lpips"]) == ("flare7kpp", "native", "flare7k")
    assert facts["d_pn"]["p50"] == pytest.approx(0.5)
    # The LPIPS rows of per_image.csv are read too (the paired statistics ignore them).
    per = sweep.per_image
    assert len(per[(per["metric"] == "lpips") & (per["trial_id"] == "ref-s0")]) == 12
    row = cells[(cells["k"] == 2) & (cells["lambda_"] == 0.6)]
    text = describe_trials(sweep, row)
    assert (text["reduction"], text["random_erasing"], text["margin"], text["lpips"]) == (
        "mean", "0.5", "0.1", "flare7k")
    assert text["lpips_fingerprint"] == "0123456789abcdef" and text["lpips_reason"] == ""
    # Mean over the two seeds of each trial's median / active fraction.
    assert distance_summary(sweep, row) == pytest.approx({"d_pn_p50": 0.45, "d_pn_hinge_active": 0.5})
    ref_text = describe_trials(sweep, cells[cells["kind"] == "reference"])
    assert ref_text["reduction"] == "" and ref_text["base_kind"] == "flare7kpp"
    assert np.isnan(distance_summary(sweep, cells[cells["kind"] == "reference"])["d_pn_p50"])
    one = cells[(cells["k"] == 1) & (cells["lambda_"] == 1.0)]  # no triplet: nothing measured
    assert np.isnan(distance_summary(sweep, one)["d_pn_p50"])


def test_results_from_before_the_fidelity_fields_read_as_unknown(tmp_path):
    from reports.collect import describe_trials, distance_summary

    sweep = load_sweep(make_results_tree(tmp_path, with_images=False))
    cells = sweep.cells
    assert cells["lpips_entire"].isna().all()
    text = describe_trials(sweep, cells[cells["kind"] == "cascade"])
    assert all(text[key] == "" for key in ("reduction", "encoder_features", "base_kind", "lpips"))
    assert np.isnan(distance_summary(sweep, cells)["d_pn_hinge_active"])


def test_no_sweep_is_a_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        load_sweep((tmp_path / "results" / "demo").resolve())  # sweep.py passes a resolved path
    assert str(err.value) == "results/demo: no sweep results (run `make sweep` first)"


def test_sweep_without_finished_trials_is_a_user_error(tmp_path):
    sweep = make_results_tree(tmp_path, with_images=False)
    for metrics in sweep.glob("trials/*/evals/*/metrics.json"):
        metrics.unlink()
    with pytest.raises(UserError, match=r"no finished trials yet \(1 failed, 5 pending\)"):
        load_sweep(sweep)


def test_stopped_and_sampled_cells(tmp_path):
    sweep = make_results_tree(tmp_path, with_images=False)
    (result_dir(sweep, "k2-l0.6-s0") / "metrics.json").unlink()
    (sweep / "trials" / "k2-l0.6-s0" / "stopped.json").write_text('{"reason": "asha", "step": 5}')
    plan = json.loads((sweep / "sweep.json").read_text())
    plan["cells"].append({**plan["cells"][1], "trial_id": "opt-1", "lambda_": 0.37,
                          "sampled": {"lambda_": 0.37}})
    (sweep / "sweep.json").write_text(json.dumps(plan))
    cells = load_sweep(sweep).cells.set_index("trial_id")
    assert cells.loc["k2-l0.6-s0", "status"] == "stopped"
    assert cells.loc["opt-1", "sampled"] and cells.loc["opt-1", "status"] == "pending"
    assert not cells.loc["k1-l1.0-s0", "sampled"]


def test_bad_plan_and_bad_per_image_name_the_file(tmp_path):
    sweep = make_results_tree(tmp_path, with_images=False)
    (result_dir(sweep, "ref-s0") / "per_image.csv").write_text("image,value\na.png,1\n")
    with pytest.raises(UserError, match=r"per_image.csv: missing column\(s\) region, metric"):
        load_sweep(sweep)
    (sweep / "sweep.json").write_text("{not json")
    with pytest.raises(UserError, match="sweep.json: unreadable JSON"):
        load_sweep(sweep)


def test_numeric_stems_stay_strings(tmp_path):
    """The trainer writes stems without extension ("000000"); they must not become the integer 0."""
    from reports.collect import _read_per_image

    path = tmp_path / "per_image.csv"
    path.write_text("image,region,metric,value\n000000,entire,psnr,20.5\n000017,entire,psnr,21.0\n")
    frame = _read_per_image(path, "t")
    assert list(frame["image"]) == ["000000", "000017"]


def test_report_statuses_map_every_trial_state():
    # One vocabulary of trial states (orchestrator.record.STATES); reports map it, none is lost.
    from orchestrator.record import STATES
    from reports.collect import REPORT_STATUS, STATUSES

    assert set(REPORT_STATUS) == set(STATES) and len(REPORT_STATUS) == len(STATES)
    assert STATUSES == ("done", "failed", "stopped", "pending")
