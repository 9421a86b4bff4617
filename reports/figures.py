"""Figures for a sweep (PNG + PDF in results/<sweep>/figures/), matplotlib only.

- metric_vs_lambda: PSNR/SSIM per region against λ, one line per k, the reference dashed, the
  control (the cascade at 0 steps) dotted, ±1 std bands over seeds where there are several.
- diff_vs_lambda: the same as differences to the reference with their 95% intervals over seeds
  and images (diff.csv's ci_low, ci_high); filled markers where the table flags the Δ (`flagged`),
  a black ring where it survives Holm too; where the diff frame has `reports.stats.POWER_COLUMNS`,
  a grey band of ± the minimum detectable difference around 0 and, under the panels, per region
  and metric what the sweep could detect and what the paper's effect sizes would need.
- qualitative: input, reference (negative) output, the anchor outputs of the best and the worst
  cell by PSNR entire (chosen from the results, named in the column titles; the paper's figure
  cell too when it is neither), ground truth and a regions panel (the mask's streak, glare and
  light source as translucent fills over the dimmed ground truth, so the outputs stay unobstructed
  and a region is visible whatever its shape); under each output its per-image PSNR/SSIM from
  per_image.csv and the share of the ground truth's light sources it keeps (like the paper's
  Figures 3-4).
The encoder's provenance (the trials' `weights_source`) is printed under the λ figures.
Figures are built on `matplotlib.figure.Figure` (no pyplot state), so any backend works.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cascade.io import IMAGE_SUFFIXES, atomic_path
from cascade.masks import region_weights
from reports.collect import DIFF_SCALE, METRICS, SweepResults, demo_reasons
from reports.stats import LEVEL, POWER, power_summary

log = logging.getLogger(__name__)

K_COLOURS = {1: "#1f77b4", 2: "#d62728"}
K_MARKERS = {1: "o", 2: "s"}
# λ offset per k so the shared λ=0 point and overlapping error bars of both k stay visible.
K_DODGE = {1: -0.012, 2: 0.012}
# Fills of the regions panel: the Flare7K mask colours (glare yellow, streak red, light blue).
REGION_FILLS = {"glare": (1.0, 0.85, 0.0), "streak": (1.0, 0.1, 0.1), "light": (0.2, 0.45, 1.0)}
FILL_ALPHA = 0.65
DIM = 0.35  # the ground truth under the fills, at this brightness
DPI = 150
# The control row (the cascade at 0 steps): a dotted line (its CI as a faint band in the Δ figure).
CONTROL_LINE = {"color": "#7f3fbf", "ls": ":", "lw": 1.6, "label": "cascade at 0 steps (control)"}


def write_figures(sweep: SweepResults, table: pd.DataFrame, diffs: pd.DataFrame, out_dir: Path,
                  *, anchor: tuple[int, float] | None = None, n_images: int = 3) -> list[Path]:
    """Write every figure that the results support; log (not raise) why one is skipped."""
    written: list[Path] = []
    banner = _demo_banner(table)
    note = encoder_note(sweep)
    if (table["method"] == "cascade").any() and table[list(METRICS)].notna().any().any():
        written += _save(metric_vs_lambda(table, banner=banner, note=note), out_dir,
                         "metric_vs_lambda")
    if len(diffs) and diffs["diff"].notna().any():
        written += _save(diff_vs_lambda(diffs, banner=banner, note=note), out_dir, "diff_vs_lambda")
    # anchor: the paper's figure cell (reports.table1.PAPER_ANCHOR), a column of its own when it
    # is neither the best nor the worst cell that the qualitative grid shows.
    fig = qualitative(sweep, table, paper_cell=anchor, n_images=n_images, banner=banner)
    if fig is not None:
        written += _save(fig, out_dir, "qualitative")
    return written


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in ("png", "pdf"):
        path = out_dir / f"{stem}.{fmt}"
        with atomic_path(path) as tmp:
            # The temporary name ends in .tmp, so the format is given explicitly. Constrained
            # layout already fits everything; bbox_inches="tight" would draw the figure twice.
            fig.savefig(tmp, format=fmt, dpi=DPI)
        paths.append(path)
    return paths


def encoder_note(sweep: SweepResults) -> str | None:
    """"f: <weights_source>" of the finished cascade trials (their distinct encoders), or None."""
    done = sweep.cells[(sweep.cells["kind"] == "cascade") & (sweep.cells["status"] == "done")]
    sources = dict.fromkeys(str(sweep.trials[t]["metrics"].get("weights_source"))
                            for t in done["trial_id"].drop_duplicates()
                            if sweep.trials[t]["metrics"].get("weights_source"))
    return ("encoder f: " + "; ".join(sources)) if sources else None


FOOTER_LINE_IN = 0.14  # inches per line of footer text at FOOTER_FONTSIZE
FOOTER_FONTSIZE = 7.5
LEGEND_IN = 0.5  # inches a one-row figure legend with a title takes


LEGEND_COLUMNS = 4
LEGEND_ROW_IN = 0.22  # the height of each legend row after the first (inches, at fontsize 9)


def _legend_and_footer(fig: Figure, handles: list, labels: list[str], lines: list[str], *,
                       title: str | None = None, fontsize: float = 9) -> None:
    """The figure legend under the panels, then `lines` of small text under it.

    Without text this is an "outside lower center" legend. With text, the constrained layout is
    confined to the area above both (its `rect`) and the figure grows by their height, so the
    panels keep their size and nothing overlaps."""
    # At most LEGEND_COLUMNS entries a row: the Δ figure's eight (reference, control, band, two k,
    # two marker kinds) would run past the figure's edge in one row.
    ncol = min(len(labels), LEGEND_COLUMNS)
    rows = -(-len(labels) // ncol) if labels else 1
    kwargs = {"ncol": ncol, "frameon": False, "fontsize": fontsize, "title": title,
              "title_fontsize": 8}
    if not lines:
        fig.legend(handles, labels, loc="outside lower center", **kwargs)
        return
    wrapped = [w for line in lines for w in textwrap.wrap(line, 175, subsequent_indent="  ")]
    text_in = (len(wrapped) + 0.5) * FOOTER_LINE_IN
    legend_in = LEGEND_IN + (rows - 1) * LEGEND_ROW_IN
    fig.set_figheight(fig.get_figheight() + text_in + legend_in)
    h = fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, (text_in + legend_in) / h, 1, 1 - (text_in + legend_in) / h))
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, text_in / h), **kwargs)
    fig.text(0.01, 0.25 * FOOTER_LINE_IN / h, "\n".join(wrapped), fontsize=FOOTER_FONTSIZE,
             ha="left", va="bottom", color="0.25")


def _demo_banner(table: pd.DataFrame) -> str | None:
    if not table["demo"].any():
        return None
    return f"DEMO, not comparable to the paper: {demo_reasons(table)}"


def _title(fig: Figure, text: str, banner: str | None) -> None:
    """Title; a demo gets red title lines so it can't pass for a real result."""
    if banner:
        fig.suptitle(f"{text}\n" + textwrap.fill(banner, 95), fontsize=10.5, color="#b00020",
                     fontweight="bold")
    else:
        fig.suptitle(text, fontsize=11)


def _grid(title: str, banner: str | None) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(10.5, 6.4), layout="constrained")
    axes = fig.subplots(2, 3)
    _title(fig, title, banner)
    return fig, axes


def _axis(axes: np.ndarray, metric: str) -> tuple[int, int]:
    kind, region = metric.split("_")
    return (0 if kind == "psnr" else 1), ("entire", "streak", "glare").index(region)


def _finish_axis(ax, metric: str, ylabel: str, lambdas: np.ndarray) -> None:
    """Title (the metric's region), y label, grid and λ axis of one panel."""
    region = metric.split("_")[1]
    ax.set_title(f"{region} region" if region != "entire" else "entire image", fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _lambda_ticks(ax, lambdas)


def _lambda_ticks(ax, lambdas: np.ndarray) -> None:
    """A tick at each grid λ; for sampled λ (a search), whose ticks would overlap, 0, 0.2, ..., 1."""
    ticks = np.unique(np.round(lambdas[np.isfinite(lambdas)], 6))
    if len(ticks) > 11 or not np.allclose(ticks * 20, np.round(ticks * 20), atol=1e-6):
        ticks = np.linspace(0.0, 1.0, 6)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("λ (weight of $L_\\mathrm{REG}$)")


def metric_vs_lambda(table: pd.DataFrame, *, banner: str | None = None,
                     note: str | None = None) -> Figure:
    """PSNR/SSIM against λ: rows PSNR, SSIM; columns entire, streak, glare."""
    fig, axes = _grid("Region metrics against λ", banner)
    ours = table[table["method"] == "cascade"]
    ref = table[table["method"] == "reference"]
    control = table[table["method"] == "control"]
    any_band = any_gap = False
    for m in METRICS:
        ax = axes[_axis(axes, m)]
        for k, rows in ours.groupby("k"):
            rows = rows.sort_values("lambda_")
            x = rows["lambda_"].to_numpy(float) + K_DODGE.get(int(k), 0.0)
            y, std = rows[m].to_numpy(float), rows[m + "_std"].to_numpy(float)
            colour = K_COLOURS.get(int(k), None)
            any_band |= bool(np.isfinite(std).any())
            # Error bars rather than bands: an isolated cell (neighbours missing) still shows one.
            ax.errorbar(x, y, yerr=np.where(np.isfinite(std), std, 0.0), fmt="-",
                        marker=K_MARKERS.get(int(k), "o"), color=colour, ms=4.5, lw=1.4,
                        capsize=3, label=f"ours, k={int(k)}")
            # A missing cell is a gap in the line plus a cross on the λ axis, never a 0.
            gaps = x[~np.isfinite(y)]
            if gaps.size:
                any_gap = True
                ax.plot(gaps, np.full(gaps.size, 0.03), "x", color=colour, ms=6, mew=1.5,
                        transform=ax.get_xaxis_transform(), clip_on=False)
        if len(ref) and np.isfinite(ref[m].iloc[0]):
            value, std = float(ref[m].iloc[0]), float(ref[m + "_std"].iloc[0])
            ax.axhline(value, color="0.3", ls="--", lw=1.1, label="Uformer (reference)")
            if np.isfinite(std):
                ax.axhspan(value - std, value + std, color="0.5", alpha=0.12, lw=0)
        if len(control) and np.isfinite(control[m].iloc[0]):
            ax.axhline(float(control[m].iloc[0]), **CONTROL_LINE)
        _finish_axis(ax, m, "PSNR (dB)" if m.startswith("psnr") else "SSIM",
                     ours["lambda_"].to_numpy(float))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if any_gap:
        handles.append(Line2D([], [], ls="", marker="x", color="0.2", mew=1.5))
        stopped = "stopped" in set(ours["status"])
        labels.append("no result (failed, stopped early or not run)" if stopped
                      else "no result (failed or not run)")
    bands = ("error bars: ±1 std over seeds; shaded: reference ±1 std" if any_band
             else "seed variance not measured (1 seed): no error bars")
    _legend_and_footer(fig, handles, labels, [note] if note else [], title=bands)
    return fig


def diff_vs_lambda(diffs: pd.DataFrame, *, banner: str | None = None,
                   note: str | None = None) -> Figure:
    """Δ vs the reference against λ with 95% intervals over seeds and images (SSIM in 1e-3):
    filled markers where `flagged`, ringed where `flagged_holm`; a footer line for rows whose seed
    variance was not measured (1 seed); with POWER_COLUMNS, ± the median minimum detectable
    difference as a grey band and a text block (`power_lines`) under the panels."""
    fig, axes = _grid("Difference to the reference (ours − Uformer), 95% interval over seeds and "
                      "images", banner)
    any_holm = False
    # The detectable Δ of the cascade cells (the control is drawn as its own line and band).
    power = power_summary(diffs[diffs["method"] == "cascade"] if "method" in diffs else diffs)
    for m in METRICS:
        ax = axes[_axis(axes, m)]
        scale = DIFF_SCALE[m]
        rows_m = diffs[diffs["metric"] == m]
        for k, rows in rows_m.groupby("k"):
            rows = rows.sort_values("lambda_")
            x = rows["lambda_"].to_numpy(float) + K_DODGE.get(int(k), 0.0)
            y = rows["diff"].to_numpy(float) * scale
            low, high = rows["ci_low"].to_numpy(float) * scale, rows["ci_high"].to_numpy(float) * scale
            colour = K_COLOURS.get(int(k), None)
            yerr = np.nan_to_num(np.vstack([y - low, high - y]), nan=0.0)
            ax.errorbar(x, y, yerr=yerr, fmt="-", color=colour, lw=1.4, capsize=3,
                        label=f"ours, k={int(k)}")
            sig = rows["flagged" if "flagged" in rows else "excludes_zero"].to_numpy(bool)
            marker = K_MARKERS.get(int(k), "o")
            ax.plot(x[sig], y[sig], marker, color=colour, ms=5.5, ls="")
            ax.plot(x[~sig], y[~sig], marker, mfc="white", mec=colour, ms=5.5, ls="")
            holm = rows["flagged_holm"].to_numpy(bool) if "flagged_holm" in rows else sig & False
            any_holm |= bool(holm.any())
            ax.plot(x[holm], y[holm], "o", mfc="none", mec="black", mew=1.1, ms=10, ls="")
        ax.axhline(0.0, color="0.3", ls="--", lw=1.1, label="Uformer (reference)")
        control = rows_m[rows_m["method"] == "control"] if "method" in rows_m else rows_m[:0]
        if len(control) and np.isfinite(control["diff"].iloc[0]):
            c = control.iloc[0]
            ax.axhline(float(c["diff"]) * scale, **CONTROL_LINE)
            if np.isfinite(c["ci_low"]) and np.isfinite(c["ci_high"]):
                ax.axhspan(float(c["ci_low"]) * scale, float(c["ci_high"]) * scale,
                           color=CONTROL_LINE["color"], alpha=0.10, lw=0)
        hit = power[power["metric"] == m] if len(power) else power
        if len(hit):
            mde = float(hit["mde"].iloc[0]) * scale
            ax.axhspan(-mde, mde, color="0.5", alpha=0.15, lw=0, label="± minimum detectable Δ")
        _finish_axis(ax, m, "ΔPSNR (dB)" if m.startswith("psnr") else "ΔSSIM (×10$^{-3}$)",
                     rows_m["lambda_"].to_numpy(float))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="o", color="0.2"),
                Line2D([], [], ls="", marker="o", mfc="white", mec="0.2")]
    labels += ["flagged", "not flagged"]
    if any_holm:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=10))
        labels.append("flagged after Holm")
    lines = [*interval_lines(diffs), *power_lines(power), *([note] if note else [])]
    _legend_and_footer(fig, handles, labels, lines)
    return fig


def interval_lines(diffs: pd.DataFrame) -> list[str]:
    """Text under the Δ figure on its intervals: what they include, and which rows had one seed
    (seed variance not measured: interval over images only, unflagged unless asked)."""
    if "seed_variance_measured" not in diffs:
        return []
    lines = ["Intervals: 95% t intervals of the mean over seeds and images, seed and image "
             "variance included (Satterthwaite df). Filled: flagged, the interval excludes 0 (one "
             "comparison at a time); ringed: also after Holm over the table's comparisons."]
    rows = diffs[diffs["diff"].notna()]
    one = rows[~rows["seed_variance_measured"].astype(bool)]
    if len(one):
        which = ("every row" if len(one) == len(rows) else
                 ", ".join(dict.fromkeys(_row_name(r) for r in one.itertuples(index=False))))
        flagged = bool(one["flagged"].any()) if "flagged" in one else False
        lines.append(f"Seed variance not measured (1 seed): {which}; intervals over images only, "
                     + ("flagged on image noise alone (--flag-on-image-noise)." if flagged
                        else "never flagged."))
    return lines


def _row_name(row) -> str:
    """"k=1, λ=0.6" for a cascade row, its method otherwise (the control)."""
    if getattr(row, "method", "cascade") != "cascade":
        return str(row.method)
    return f"k={int(row.k)}, λ={row.lambda_:g}"


def _count(value: float) -> str:
    if not np.isfinite(value):
        return "∞" if value > 0 else "?"
    return f"{int(value):,}"


def _seeds(value: float) -> str:
    return f"{_count(value)} seed" + ("" if value == 1 else "s")


def _effect(value: float, metric: str) -> str:
    return f"{value:g} dB" if metric.startswith("psnr") else f"{value:g} SSIM"


def power_lines(power: pd.DataFrame) -> list[str]:
    """Text under the Δ figure: per region and metric, the minimum detectable Δ of this sweep and
    the images (at its seeds) / seeds (at its images) the paper's small and large effects need."""
    if power.empty:
        return []
    first = power.iloc[0]
    measured = bool(first.get("seed_variance_measured", int(first["n_seeds"]) >= 2))
    variance = ("the paired per-image and per-seed variance" if measured else
                "the paired per-image variance alone (seed variance not measured, 1 seed)")
    lines = [f"Minimum detectable Δ (grey band; median over cells) at {LEVEL:.0%} confidence, "
             f"{POWER:.0%} power, t quantiles at the intervals' df, from {variance} "
             f"({int(first['n_images'])} images, {int(first['n_seeds'])} seed(s)). An effect of the "
             "paper's size needs at least N images (at these seeds) or M seeds (at these images); "
             "at least: the fewest any cell needs, ∞: the other factor's variance alone is too large:"]
    parts = []
    for row in power.itertuples(index=False):
        kind, region = row.metric.split("_")
        unit = " dB" if kind == "psnr" else ""
        mde = f"{row.mde:.3g}{unit}" if kind == "psnr" else f"{row.mde:.2g}"
        parts.append(f"{kind.upper()} {region}: MDE {mde}; {_effect(row.effect_large, row.metric)}: "
                     f"{_count(row.n_images_large)} img / {_seeds(row.n_seeds_large)}; "
                     f"{_effect(row.effect_small, row.metric)}: {_count(row.n_images_small)} img / "
                     f"{_seeds(row.n_seeds_small)}")
    return lines + parts


# -- qualitative grid -----------------------------------------------------------------------------
def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    from PIL import Image  # Pillow ships with matplotlib

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class Shown:
    """One output column of the qualitative grid: a finished trial of a table cell."""

    trial_id: str
    title: str  # the column's title: which cell, why it is shown, its seed and its table value


def _cell_label(k: object, lambda_: object) -> str:
    """"k=2, λ=0.6"; "λ=0" for the λ = 0 cell, which both k share."""
    lam = float(lambda_)
    return f"λ={lam:g}" if lam == 0.0 or pd.isna(k) else f"k={int(k)}, λ={lam:g}"


def _pick_trials(sweep: SweepResults, table: pd.DataFrame, paper_cell: tuple[int, float] | None = None
                 ) -> tuple[str, list[Shown]] | None:
    """(reference trial, the output columns): the best and the worst cascade cell by PSNR over the
    entire image (Table 1's mean over seeds, `table`), then `paper_cell` when it finished and is
    neither. Each column shows the cell's trial of its lowest finished seed; the reference column
    the reference of that seed (else the lowest). None without a finished reference and cell.

    The choice comes from the results: a fixed cell (the paper's k=2, λ=0.6) can be the one that
    erases the light sources, and nothing in the figure would say that other cells do not.
    """
    cells = sweep.cells[sweep.cells["status"] == "done"].sort_values("seed", na_position="last")
    refs, ours = cells[cells["kind"] == "reference"], cells[cells["kind"] == "cascade"]
    scored = table[table["method"] == "cascade"].dropna(subset=["psnr_entire"])
    if refs.empty or ours.empty or scored.empty:
        return None
    order = scored.sort_values("psnr_entire", ascending=False, kind="stable")
    picks = [("best", order.iloc[0]), ("worst", order.iloc[-1])]
    if len(order) == 1:
        picks = [("only cell", order.iloc[0])]
    if paper_cell is not None:
        hit = order[(order["k"] == paper_cell[0]) & np.isclose(order["lambda_"], paper_cell[1])]
        if len(hit) and not any(hit.index[0] == row.name for _, row in picks):
            picks.append(("the paper's figure cell", hit.iloc[0]))
    shown, seed = [], None
    for why, row in picks:
        lam_0 = float(row["lambda_"]) == 0.0
        trials = ours[np.isclose(ours["lambda_"].astype(float), float(row["lambda_"]))
                      & ((ours["k"] == row["k"]) | lam_0)]
        if trials.empty:
            continue
        trial = trials.iloc[0]
        seed = trial["seed"] if seed is None else seed
        seed_text = f", seed {int(trial['seed'])}" if pd.notna(trial["seed"]) else ""
        shown.append(Shown(str(trial["trial_id"]),
                           f"{why.capitalize()}: {_cell_label(row['k'], row['lambda_'])}{seed_text}\n"
                           f"(cell mean PSNR {row['psnr_entire']:.2f} dB)"))
    if not shown:
        return None
    same_seed = refs[refs["seed"] == seed] if seed is not None and pd.notna(seed) else refs.iloc[:0]
    ref = (same_seed if len(same_seed) else refs).iloc[0]
    return str(ref["trial_id"]), shown


def _test_dir(sweep: SweepResults, trial_id: str) -> Path | None:
    facts = sweep.trials[trial_id]
    folder = facts.get("test_data") or facts.get("test_data_dir")
    return Path(folder) if folder else None


def _scores(sweep: SweepResults, trial_id: str, stem: str) -> str:
    """"PSNR 21.35 dB, SSIM 0.7012": the trial's per_image.csv values of `stem`, entire image."""
    rows = sweep.per_image[(sweep.per_image["trial_id"] == trial_id)
                           & (sweep.per_image["image"] == stem) & (sweep.per_image["region"] == "entire")]
    values = dict(zip(rows["metric"], rows["value"]))
    if not values:
        return "(no per-image metrics)"
    psnr, ssim = values.get("psnr", np.nan), values.get("ssim", np.nan)
    return f"PSNR {psnr:.2f} dB, SSIM {ssim:.4f}"


def light_kept(image: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float | None:
    """How much of the ground truth's light sources `image` keeps: the light-source-weighted sum
    of its mean-channel level over the ground truth's (1 = kept, 0 = erased to black; above 1:
    brighter). None when `mask` has no light source. All (H, W, 3) uint8 of one size."""
    w = region_weights(mask)["light"]
    if w.sum() <= 0:
        return None
    level = (w * gt.astype(np.float64).mean(axis=2)).sum()
    return float((w * image.astype(np.float64).mean(axis=2)).sum() / level) if level > 0 else None


def _light_text(image: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> str:
    kept = light_kept(image, gt, mask) if image.shape == gt.shape == mask.shape else None
    return "" if kept is None else f"\nlight sources: {kept:.0%} of the gt's level"


def regions_panel(gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The regions of `mask` as translucent fills (REGION_FILLS) over the dimmed `gt`.

    gt, mask: (H, W, 3) uint8 of the same size. Returns (H, W, 3) float in [0, 1]. Each pixel is
    blended with every region it belongs to (weight x FILL_ALPHA), glare, then streak, then the
    light source on top, as Flare7K paints its masks."""
    weights = region_weights(mask)
    out = gt.astype(np.float64) / 255.0 * DIM
    for region, colour in REGION_FILLS.items():
        a = (weights[region] * FILL_ALPHA)[..., None]
        out = out * (1 - a) + np.asarray(colour) * a
    return np.clip(out, 0.0, 1.0)


def qualitative(sweep: SweepResults, table: pd.DataFrame, *,
                paper_cell: tuple[int, float] | None = None, n_images: int = 3,
                banner: str | None = None) -> Figure | None:
    """Input | reference output | best cell | worst cell [| paper_cell] | ground truth | regions,
    a row per test image (`_pick_trials` chooses the cells; test images with a light source
    first). Under each output: its PSNR/SSIM over the entire image, the trial's own per_image.csv
    values, and how much of the ground truth's light sources it keeps (`light_kept`).

    Returns None (and logs why) when samples or the test set are not on disk.
    """
    picked = _pick_trials(sweep, table, paper_cell)
    if picked is None:
        log.info("qualitative figure skipped: needs a finished reference and cascade trial")
        return None
    ref_id, shown = picked
    test_dir = next((d for d in (_test_dir(sweep, c.trial_id) for c in shown) if d), None)
    test_dir = test_dir or _test_dir(sweep, ref_id)
    if test_dir is None or not (test_dir / "input").is_dir():
        log.info("qualitative figure skipped: test set folder %s not found", test_dir)
        return None
    outputs = [(ref_id, "Reference (negative) output")] + [(c.trial_id, c.title) for c in shown]
    folders = [sweep.eval_dir(t) / "samples" for t, _ in outputs]
    stems = sorted(p.stem for p in folders[1].glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = [s for s in stems if all(_find_image(f, s) for f in folders) and all(
        _find_image(test_dir / sub, s) for sub in ("input", "gt", "mask"))]
    if not stems:
        log.info("qualitative figure skipped: no sample shared by %s and %s",
                 ", ".join(map(str, folders)), test_dir)
        return None
    masks = {s: _read_rgb(_find_image(test_dir / "mask", s)) for s in stems}
    stems = sorted(stems, key=lambda s: region_weights(masks[s])["light"].sum() <= 0)[:n_images]

    titles = ["Input", *(title for _, title in outputs), "Ground truth", "Regions (mask)"]
    fig = Figure(figsize=(2.7 * len(titles), 3.1 * len(stems) + 1.1), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(stems), len(titles)))
    for r, stem in enumerate(stems):
        mask = masks[stem]
        gt = _read_rgb(_find_image(test_dir / "gt", stem))
        regions = regions_panel(gt, mask) if mask.shape == gt.shape else mask / 255.0
        panels = [(_read_rgb(_find_image(test_dir / "input", stem)), "")]
        for (trial_id, _), folder in zip(outputs, folders):
            image = _read_rgb(_find_image(folder, stem))
            panels.append((image, _scores(sweep, trial_id, stem) + _light_text(image, gt, mask)))
        panels += [(gt, ""), (regions, "")]
        for c, (image, caption) in enumerate(panels):
            ax = axes[r, c]
            h, w = image.shape[:2]
            # Normalised extent: images of other sizes still line up.
            ax.imshow(image, extent=(0, 1, 1, 0))
            ax.set_xlim(0, 1)
            ax.set_ylim(1, 0)
            ax.set_aspect(h / w)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=8.5)
            if r == 0:
                ax.set_title(titles[c], fontsize=9.5)
        axes[r, 0].set_ylabel(stem, fontsize=9)
    handles = [Patch(facecolor=c, alpha=FILL_ALPHA) for c in REGION_FILLS.values()]
    fig.legend(handles, [f"{r} region" if r != "light" else "light source" for r in REGION_FILLS],
               loc="outside lower center", ncol=len(REGION_FILLS), frameon=False, fontsize=9,
               title="regions panel: the test mask over the dimmed ground truth", title_fontsize=8)
    _title(fig, "Qualitative comparison on test images: the best and the worst cell by PSNR over "
           "the entire image (per image: PSNR/SSIM entire, per_image.csv)", banner)
    return fig
