"""Figures for a sweep (PNG + PDF in results/<sweep>/figures/), matplotlib only.

- metric_vs_lambda: PSNR/SSIM per region against λ, one line per k, the reference dashed,
  ±1 std bands over seeds where there are several.
- diff_vs_lambda: the same as differences to the reference with paired bootstrap 95% CI bands;
  filled markers where the CI excludes 0; where the diff frame has `reports.stats.POWER_COLUMNS`,
  a grey band of ± the minimum detectable difference around 0 and, under the panels, per region
  and metric what the sweep could detect and what the paper's effect sizes would need.
- qualitative: input, reference (negative) output, anchor output, ground truth and a regions panel
  (the mask's streak, glare and light source as translucent fills over the dimmed ground truth,
  so the outputs stay unobstructed and a region is visible whatever its shape), per-image PSNR/SSIM
  under each output (like the paper's Figures 3-4).
The encoder's provenance (the trials' `weights_source`) is printed under the λ figures.
Figures are built on `matplotlib.figure.Figure` (no pyplot state), so any backend works.
"""

from __future__ import annotations

import logging
import textwrap
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
    fig = qualitative(sweep, table, anchor=anchor, n_images=n_images, banner=banner)
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


def _legend_and_footer(fig: Figure, handles: list, labels: list[str], lines: list[str], *,
                       title: str | None = None, fontsize: float = 9) -> None:
    """The figure legend under the panels, then `lines` of small text under it.

    Without text this is an "outside lower center" legend. With text, the constrained layout is
    confined to the area above both (its `rect`) and the figure grows by their height, so the
    panels keep their size and nothing overlaps."""
    kwargs = {"ncol": len(labels), "frameon": False, "fontsize": fontsize, "title": title,
              "title_fontsize": 8}
    if not lines:
        fig.legend(handles, labels, loc="outside lower center", **kwargs)
        return
    wrapped = [w for line in lines for w in textwrap.wrap(line, 175, subsequent_indent="  ")]
    text_in = (len(wrapped) + 0.5) * FOOTER_LINE_IN
    fig.set_figheight(fig.get_figheight() + text_in + LEGEND_IN)
    h = fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, (text_in + LEGEND_IN) / h, 1, 1 - (text_in + LEGEND_IN) / h))
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
        _finish_axis(ax, m, "PSNR (dB)" if m.startswith("psnr") else "SSIM",
                     ours["lambda_"].to_numpy(float))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if any_gap:
        handles.append(Line2D([], [], ls="", marker="x", color="0.2", mew=1.5))
        stopped = "stopped" in set(ours["status"])
        labels.append("no result (failed, stopped early or not run)" if stopped
                      else "no result (failed or not run)")
    bands = ("error bars: ±1 std over seeds; shaded: reference ±1 std" if any_band
             else "one seed per cell (no error bars)")
    _legend_and_footer(fig, handles, labels, [note] if note else [], title=bands)
    return fig


def diff_vs_lambda(diffs: pd.DataFrame, *, banner: str | None = None,
                   note: str | None = None) -> Figure:
    """Δ vs the reference against λ with paired bootstrap 95% CI bands (SSIM in 1e-3); with
    POWER_COLUMNS, ± the median minimum detectable difference as a grey band and a text block
    (`power_lines`) under the panels."""
    fig, axes = _grid("Difference to the reference (ours − Uformer), paired bootstrap 95% CI", banner)
    power = power_summary(diffs)
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
            sig = rows["excludes_zero"].to_numpy(bool)
            marker = K_MARKERS.get(int(k), "o")
            ax.plot(x[sig], y[sig], marker, color=colour, ms=5.5, ls="")
            ax.plot(x[~sig], y[~sig], marker, mfc="white", mec=colour, ms=5.5, ls="")
        ax.axhline(0.0, color="0.3", ls="--", lw=1.1, label="Uformer (reference)")
        hit = power[power["metric"] == m] if len(power) else power
        if len(hit):
            mde = float(hit["mde"].iloc[0]) * scale
            ax.axhspan(-mde, mde, color="0.5", alpha=0.15, lw=0, label="± minimum detectable Δ")
        _finish_axis(ax, m, "ΔPSNR (dB)" if m.startswith("psnr") else "ΔSSIM (×10$^{-3}$)",
                     rows_m["lambda_"].to_numpy(float))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="o", color="0.2"),
                Line2D([], [], ls="", marker="o", mfc="white", mec="0.2")]
    labels += ["95% CI excludes 0", "95% CI includes 0"]
    _legend_and_footer(fig, handles, labels, power_lines(power) + ([note] if note else []))
    return fig


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
    lines = [f"Minimum detectable Δ (grey band; median over cells) at {LEVEL:.0%} confidence, "
             f"{POWER:.0%} power, from the paired per-image and per-seed variance "
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


def _pick_trials(sweep: SweepResults, table: pd.DataFrame,
                 anchor: tuple[int, float] | None) -> tuple[str, str, str] | None:
    """(reference trial, anchor trial, anchor label): the paper's cell if it finished, else the
    finished cell with the best entire-image PSNR."""
    cells = sweep.cells[sweep.cells["status"] == "done"].sort_values("seed", na_position="last")
    refs, ours = cells[cells["kind"] == "reference"], cells[cells["kind"] == "cascade"]
    if refs.empty or ours.empty:
        return None
    chosen = pd.DataFrame()
    if anchor is not None:
        chosen = ours[(ours["k"] == anchor[0]) & np.isclose(ours["lambda_"], anchor[1])]
    if chosen.empty:
        best = table[table["method"] == "cascade"].dropna(subset=["psnr_entire"])
        if best.empty:
            return None
        top = best.loc[best["psnr_entire"].idxmax()]
        chosen = ours[(ours["k"] == top["k"]) & np.isclose(ours["lambda_"], top["lambda_"])]
    pick = chosen.iloc[0]
    same_seed = refs[refs["seed"] == pick["seed"]] if pd.notna(pick["seed"]) else refs.iloc[:0]
    ref = (same_seed if len(same_seed) else refs).iloc[0]
    label = f"k={int(pick['k'])}, λ={pick['lambda_']:g}"
    return str(ref["trial_id"]), str(pick["trial_id"]), label


def _test_dir(sweep: SweepResults, trial_id: str) -> Path | None:
    facts = sweep.trials[trial_id]
    folder = facts.get("test_data") or facts.get("test_data_dir")
    return Path(folder) if folder else None


def _scores(sweep: SweepResults, trial_id: str, stem: str) -> str:
    rows = sweep.per_image[(sweep.per_image["trial_id"] == trial_id)
                           & (sweep.per_image["image"] == stem) & (sweep.per_image["region"] == "entire")]
    values = dict(zip(rows["metric"], rows["value"]))
    if not values:
        return "(no per-image metrics)"
    psnr, ssim = values.get("psnr", np.nan), values.get("ssim", np.nan)
    return f"PSNR {psnr:.2f} dB, SSIM {ssim:.4f}"


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


def qualitative(sweep: SweepResults, table: pd.DataFrame, *, anchor: tuple[int, float] | None = None,
                n_images: int = 3, banner: str | None = None) -> Figure | None:
    """Input | reference output | anchor output | ground truth | regions, a row per test image.

    Returns None (and logs why) when samples or the test set are not on disk.
    """
    picked = _pick_trials(sweep, table, anchor)
    if picked is None:
        log.info("qualitative figure skipped: needs a finished reference and cascade trial")
        return None
    ref_id, anchor_id, anchor_label = picked
    test_dir = _test_dir(sweep, anchor_id) or _test_dir(sweep, ref_id)
    if test_dir is None or not (test_dir / "input").is_dir():
        log.info("qualitative figure skipped: test set folder %s not found", test_dir)
        return None
    ref_samples = sweep.trial_dir(ref_id) / "samples"
    anchor_samples = sweep.trial_dir(anchor_id) / "samples"
    stems = sorted(p.stem for p in anchor_samples.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = [s for s in stems if _find_image(ref_samples, s) and all(
        _find_image(test_dir / sub, s) for sub in ("input", "gt", "mask"))][:n_images]
    if not stems:
        log.info("qualitative figure skipped: no sample shared by %s, %s and %s",
                 ref_samples, anchor_samples, test_dir)
        return None

    titles = ["Input", "Reference (negative) output", f"Anchor output ({anchor_label})",
              "Ground truth", "Regions (mask)"]
    fig = Figure(figsize=(13.5, 2.95 * len(stems) + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(stems), len(titles)))
    for r, stem in enumerate(stems):
        mask = _read_rgb(_find_image(test_dir / "mask", stem))
        gt = _read_rgb(_find_image(test_dir / "gt", stem))
        regions = regions_panel(gt, mask) if mask.shape == gt.shape else mask / 255.0
        panels = [
            (_read_rgb(_find_image(test_dir / "input", stem)), ""),
            (_read_rgb(_find_image(ref_samples, stem)), _scores(sweep, ref_id, stem)),
            (_read_rgb(_find_image(anchor_samples, stem)), _scores(sweep, anchor_id, stem)),
            (gt, ""),
            (regions, ""),
        ]
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
                ax.set_title(titles[c], fontsize=10)
        axes[r, 0].set_ylabel(stem, fontsize=9)
    handles = [Patch(facecolor=c, alpha=FILL_ALPHA) for c in REGION_FILLS.values()]
    fig.legend(handles, [f"{r} region" if r != "light" else "light source" for r in REGION_FILLS],
               loc="outside lower center", ncol=len(REGION_FILLS), frameon=False, fontsize=9,
               title="regions panel: the test mask over the dimmed ground truth", title_fontsize=8)
    _title(fig, "Qualitative comparison on test images (PSNR/SSIM: entire image)", banner)
    return fig
