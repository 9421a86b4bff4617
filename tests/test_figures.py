"""reports.figures: every figure is written as PNG + PDF, non-empty, and shows what it claims."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from test_collect import make_results_tree

from reports.collect import load_sweep
from reports.figures import (
    DIM,
    FILL_ALPHA,
    REGION_FILLS,
    diff_vs_lambda,
    light_kept,
    metric_vs_lambda,
    power_lines,
    qualitative,
    regions_panel,
    write_figures,
)
from reports.stats import POWER_COLUMNS, power_summary
from reports.table1 import diff_frame, table1_frame


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sweep = load_sweep(make_results_tree(tmp_path_factory.mktemp("fig"), seeds=(0, 1)))
    return sweep, table1_frame(sweep), diff_frame(sweep, n_resamples=200)


@pytest.mark.slow
def test_all_figures_written_as_png_and_pdf(built):
    sweep, table, diffs = built
    out = sweep.root / "figures"
    written = write_figures(sweep, table, diffs, out, anchor=(2, 0.6))
    stems = ("metric_vs_lambda", "diff_vs_lambda", "qualitative")
    assert sorted(p.name for p in written) == sorted(f"{s}.{e}" for s in stems for e in ("png", "pdf"))
    for path in written:
        assert path.stat().st_size > 1000
        if path.suffix == ".pdf":
            assert path.read_bytes().startswith(b"%PDF")
        else:
            image = imread(path)
            assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01
    assert not list(out.glob(".*tmp"))


def test_metric_vs_lambda_lines_and_missing_cells(built):
    _, table, _ = built
    fig = metric_vs_lambda(table, banner="DEMO, not comparable to the paper: x")
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_ylabel() for ax in axes] == ["PSNR (dB)"] * 3 + ["SSIM"] * 3
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert set(labels[:3]) == {"ours, k=1", "ours, k=2", "Uformer (reference)"}
    assert "DEMO" in fig._suptitle.get_text()
    # The reference is a horizontal line at its table value.
    ref = table.loc[table["method"] == "reference", "psnr_entire"].iloc[0]
    hlines = [line for line in axes[0].get_lines() if np.ptp(line.get_ydata()) == 0
              and len(line.get_ydata()) == 2]
    assert any(np.isclose(line.get_ydata()[0], ref) for line in hlines)


def test_metric_vs_lambda_marks_a_failed_cell(built):
    _, table, _ = built
    table = table.copy()
    table.loc[(table["k"] == 2) & (table["lambda_"] == 0.6), ["psnr_entire", "psnr_entire_std"]] = np.nan
    fig = metric_vs_lambda(table)
    crosses = [line for line in fig.axes[0].get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and np.allclose(crosses[0].get_xdata(), 0.612)
    assert "no result (failed or not run)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_sampled_lambdas_get_regular_ticks_and_stopped_cells_are_named(built):
    # An Optuna search: λ values anywhere in [0, 1], some trials stopped early by ASHA.
    _, table, _ = built
    table = table.copy()
    ours = table["method"] == "cascade"
    table.loc[ours, "lambda_"] = np.linspace(0.013, 0.987, int(ours.sum()))
    first = table.index[ours][0]
    table.loc[first, ["psnr_entire", "psnr_entire_std"]] = np.nan
    table.loc[first, "status"] = "stopped"
    fig = metric_vs_lambda(table)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "no result (failed, stopped early or not run)" in labels


def test_diff_markers_filled_only_where_flagged_and_ringed_where_holm(built):
    _, _, diffs = built
    diffs = diffs.copy()
    first = diffs.index[(diffs["metric"] == "psnr_entire") & diffs["flagged"]][0]
    diffs.loc[first, "flagged_holm"] = True  # (the tiny tree has none of its own)
    fig = diff_vs_lambda(diffs)
    ax = fig.axes[0]  # ΔPSNR, entire image
    rows = diffs[diffs["metric"] == "psnr_entire"]
    points = [ln for ln in ax.get_lines() if ln.get_linestyle() == "None" and ln.get_marker() in "os"]
    rings = [ln for ln in points if ln.get_markerfacecolor() == "none"]
    filled = [ln for ln in points if ln.get_markerfacecolor() not in ("white", "none")]
    hollow = [ln for ln in points if ln.get_markerfacecolor() == "white"]
    assert sum(len(ln.get_xdata()) for ln in filled) == int(rows["flagged"].sum())
    assert sum(len(ln.get_xdata()) for ln in hollow) == int((~rows["flagged"]).sum())
    assert sum(len(ln.get_xdata()) for ln in rings) == 1
    # The partial cell (k=1, λ=0.6: one seed finished) measured no seed variance: never flagged.
    partial = rows[(rows["k"] == 1) & np.isclose(rows["lambda_"], 0.6)].iloc[0]
    assert not partial["seed_variance_measured"] and not partial["flagged"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "flagged" in labels and "flagged after Holm" in labels
    footer = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "Seed variance not measured (1 seed): k=1, λ=0.6; intervals over images only, never flagged." in footer
    assert "95% interval over seeds and images" in fig._suptitle.get_text()


def _caption_values(caption: str) -> tuple[float, float]:
    """(PSNR, SSIM) from a caption's first line "PSNR 23.41 dB, SSIM 0.8712"."""
    words = caption.splitlines()[0].replace(",", "").split()
    return float(words[1]), float(words[4])


def test_qualitative_shows_the_best_and_the_worst_cell_with_their_per_image_values(built):
    sweep, table, _ = built
    fig = qualitative(sweep, table, n_images=2)
    axes = np.array(fig.axes).reshape(2, 6)
    ours = table[table["method"] == "cascade"]
    best, worst = ours.loc[ours["psnr_entire"].idxmax()], ours.loc[ours["psnr_entire"].idxmin()]
    assert (best["k"], best["lambda_"], worst["k"], worst["lambda_"]) == (2, 1.0, 2, 0.6)  # EFFECTS
    titles = [ax.get_title() for ax in axes[0]]
    assert titles[:2] == ["Input", "Reference (negative) output"]
    assert titles[2] == f"Best: k=2, λ=1, seed 0\n(cell mean PSNR {best['psnr_entire']:.2f} dB)"
    assert titles[3] == f"Worst: k=2, λ=0.6, seed 0\n(cell mean PSNR {worst['psnr_entire']:.2f} dB)"
    assert titles[4:] == ["Ground truth", "Regions (mask)"]
    # The numbers under each output are that trial's per_image.csv values of that image.
    per = sweep.per_image[sweep.per_image["region"] == "entire"]
    for r in range(2):
        stem = axes[r, 0].get_ylabel()
        for c, trial in ((1, "ref-s0"), (2, "k2-l1.0-s0"), (3, "k2-l0.6-s0")):
            rows = per[(per["trial_id"] == trial) & (per["image"] == stem)].set_index("metric")["value"]
            psnr, ssim = _caption_values(axes[r, c].get_xlabel())
            assert psnr == pytest.approx(rows["psnr"], abs=0.005)
            assert ssim == pytest.approx(rows["ssim"], abs=0.00005)
    assert _caption_values(axes[0, 2].get_xlabel()) != _caption_values(axes[0, 3].get_xlabel())
    # No outlines over the outputs: the regions are a panel of their own.
    assert not any(ax.collections for ax in axes.ravel())


def test_qualitative_cells_follow_the_results_and_the_paper_cell_is_added_once(built):
    sweep, table, _ = built
    lowered = table.copy()
    hit = (lowered["method"] == "cascade") & (lowered["k"] == 1) & (lowered["lambda_"] == 1.0)
    lowered.loc[hit, "psnr_entire"] = 0.0  # now the worst cell
    titles = [ax.get_title() for ax in qualitative(sweep, lowered, n_images=1).axes]
    assert titles[3].startswith("Worst: k=1, λ=1, seed 0\n(cell mean PSNR 0.00 dB)")
    # The paper's cell is a column of its own unless it is already shown (here: the worst).
    extra = qualitative(sweep, table, paper_cell=(1, 1.0), n_images=1)
    assert len(extra.axes) == 7 and extra.axes[4].get_title().startswith(
        "The paper's figure cell: k=1, λ=1, seed 0")
    assert len(qualitative(sweep, table, paper_cell=(2, 0.6), n_images=1).axes) == 6


def test_light_kept_is_the_weighted_level_ratio_and_is_captioned():
    gt = np.zeros((4, 4, 3), np.uint8)
    gt[1, 1] = 200
    gt[2, 2] = 100
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[1, 1] = mask[2, 2] = (0, 0, 255)  # two light-source pixels
    out = gt.copy()
    out[1, 1] = 50  # one light source dimmed: (50 + 100) / (200 + 100)
    assert light_kept(out, gt, mask) == pytest.approx(0.5)
    assert light_kept(gt, gt, mask) == pytest.approx(1.0)
    assert light_kept(np.zeros_like(gt), gt, mask) == 0.0
    assert light_kept(out, gt, np.zeros_like(mask)) is None  # no light source in the mask


def test_regions_panel_fills_every_region_and_dims_the_rest():
    gt = np.full((8, 8, 3), 200, np.uint8)
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[0] = (255, 255, 0)  # glare
    mask[1] = (255, 0, 0)  # streak: a thin line stays visible as a fill, not a contour
    mask[2, 2] = (0, 0, 255)  # a one-pixel light source
    panel = regions_panel(gt, mask)
    dim = 200 / 255 * DIM
    np.testing.assert_allclose(panel[5, 5], [dim] * 3)  # outside every region: dimmed gt
    for row, region in ((0, "glare"), (1, "streak")):
        expected = dim * (1 - FILL_ALPHA) + np.asarray(REGION_FILLS[region]) * FILL_ALPHA
        np.testing.assert_allclose(panel[row, 4], expected)
    light = dim * (1 - FILL_ALPHA) + np.asarray(REGION_FILLS["light"]) * FILL_ALPHA
    np.testing.assert_allclose(panel[2, 2], light)


def test_diff_figure_shows_the_minimum_detectable_difference(built):
    _, _, diffs = built
    rows = []
    for metric in diffs["metric"].unique():
        rows.append({"metric": metric, "mde": 0.2 if metric.startswith("psnr") else 0.002,
                     "sd_image": 0.3, "sd_seed": 0.05, "effect_small": 0.01, "effect_large": 0.3,
                     "n_images_small": np.inf, "n_images_large": 40.0, "n_seeds_small": np.inf,
                     "n_seeds_large": 2.0})
    power = pd.DataFrame(rows)
    with_power = diffs.drop(columns=[c for c in POWER_COLUMNS if c in diffs]).merge(power, on="metric")
    fig = diff_vs_lambda(with_power, note="encoder f: flaresweep:flare_seg/abc (trained ...)")
    band = [p for p in fig.axes[0].patches if p.get_label() == "± minimum detectable Δ"]
    assert len(band) == 1
    assert np.isclose(band[0].get_y(), -0.2) and np.isclose(band[0].get_height(), 0.4)
    (footer,) = [t for t in fig.texts if "Minimum detectable" in t.get_text()]
    text = footer.get_text().replace("\n", " ")
    assert "PSNR entire: MDE 0.2 dB; 0.3 dB: 40 img / 2 seeds; 0.01 dB: ∞ img / ∞ seeds" in text
    assert "80% power" in text and "encoder f: flaresweep:flare_seg/abc" in text
    lines = power_lines(power_summary(with_power.assign(n_seeds=3)))
    assert "(12 images, 3 seed(s))" in lines[0]


def test_power_summary_takes_the_median_mde_and_the_fewest_images_any_cell_needs():
    diffs = pd.DataFrame({"metric": ["psnr_entire"] * 3, "n_images": [96] * 3, "n_seeds": [3] * 3,
                          "mde": [0.5, 0.6, 9.0], "effect_small": 0.01, "effect_large": 0.3,
                          "n_images_small": [np.inf] * 3, "n_images_large": [300.0, np.inf, np.inf],
                          "n_seeds_small": [np.inf] * 3, "n_seeds_large": [np.inf, 4.0, np.inf]})
    (row,) = power_summary(diffs).to_dict("records")
    assert row["mde"] == 0.6 and row["n_images_large"] == 300 and row["n_seeds_large"] == 4


def test_write_figures_adds_the_power_columns_when_the_diff_frame_lacks_them(built, tmp_path):
    sweep, table, diffs = built
    bare = diffs.drop(columns=[c for c in POWER_COLUMNS if c in diffs])
    written = write_figures(sweep, table, bare, tmp_path, anchor=(2, 0.6))
    assert (tmp_path / "diff_vs_lambda.png") in written


def test_qualitative_with_one_cell_or_without_images(built, tmp_path):
    sweep, table, _ = built
    one = table[(table["method"] != "cascade") | ((table["k"] == 1) & (table["lambda_"] == 0.6))]
    fig = qualitative(sweep, one, n_images=1)
    assert [ax.get_title() for ax in fig.axes][2].startswith("Only cell: k=1, λ=0.6, seed 1")
    bare = load_sweep(make_results_tree(tmp_path, with_images=False))
    assert qualitative(bare, table1_frame(bare)) is None
