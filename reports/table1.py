"""Table 1 of the paper regenerated from a sweep: CSV + LaTeX, differences with CIs, paper side by side.

    python -m reports.table1 --sweep-dir results/<sweep> [--no-paper]

Writes into the sweep folder (atomically): table1.csv/.tex, diff.csv/.tex, paper_vs_ours.csv and
figures/ (see results/README.md). `build_reports` is the entry point `sweep.py table1` calls.

Spelling: our CSVs use `lambda_` (the project-wide name); the published paper_table1.csv uses
`lambda`, renamed to `lambda_` when read (`read_paper`). Differences are called `diff`, never
`delta` (that name is the perceptual-loss weight in TrialConfig).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cascade.config import EVAL_ONLY_KINDS
from cascade.errors import cli_errors
from cascade.io import atomic_path, atomic_write_text
from reports import stats, table_provenance
from reports.collect import (
    DIFF_SCALE,
    LPIPS_METRIC,
    METRICS,
    SweepResults,
    demo_reasons,
    describe_trials,
    distance_summary,
    load_sweep,
)

log = logging.getLogger(__name__)

PAPER_CSV = Path(__file__).parent / "data" / "paper_table1.csv"
# The paper picks this cell for its figures; the qualitative grid shows it when it finished.
PAPER_ANCHOR = (2, 0.6)
DECIMALS = {m: 2 if m.startswith("psnr") else 4 for m in METRICS}  # the paper's rounding
DECIMALS[LPIPS_METRIC] = 4  # as Flare7K's tables
SIGNIFICANT = "$^{\\ast}$"  # a flagged Δ: its 95% interval (seed and image variance) excludes 0
HOLM = "$^{\\dagger}$"  # a flagged Δ that also survives Holm over the table's comparisons
# Every package the generated tables need (the header comment of each .tex names them; the
# captions' \lVert is amsmath's). tests/test_table1.py compiles with exactly these.
LATEX_PACKAGES = ("booktabs", "amsmath")
TABLE1_WHAT = ("Table 1 regenerated: mean PSNR (dB) and SSIM over the entire image and its streak "
               "and glare regions, and LPIPS over the entire image; best per column in bold.")
REGION_NAMES = {"entire": "Entire", "streak": "Streak", "glare": "Glare"}
# The Method column of the rows without k and λ (cascade.config.EVAL_ONLY_KINDS, in table order).
METHOD_LABELS = {"reference": "Uformer (reference)", "control": "Cascade, 0 steps (control)"}
# The evaluation views (cascade.data.views.VIEWS; a test keeps them equal), for captions.
VIEW_TEXT = {
    "resize-bilinear": "each test image resized to {s}x{s} px, bilinear, antialiased (PIL, as "
                       "torchvision 0.15's Resize)",
    "resize-bicubic": "each test image resized to {s}x{s} px, bicubic, antialiased (PIL)",
    "resize-area": "each test image resized to {s}x{s} px by area averaging",
    "resize-bilinear-noaa": "each test image resized to {s}x{s} px, bilinear without antialiasing",
    "center-crop": "the central {s}x{s} px crop of each test image",
    "tiles": "the {s}x{s} px tiles of each test image, metrics averaged per image",
}
CONTROL_TEXT = ("Control: the cascade at 0 steps (both networks the base, the base applied to its "
                "own output), evaluated only; a cell's difference to it is what the fine-tuning "
                "did, its own difference to the reference what the double pass does.")
META_COLUMNS = ("protocol", "encoder", "encoder_pretrained", "dataset", "test_set", "checkpoint",
                "demo", "demo_reasons")
# What the loss and the evaluation path were (issue 17), after META_COLUMNS; d_pn_* are numbers.
FIDELITY_COLUMNS = ("training", "data_loader", "reduction", "encoder_features", "random_erasing",
                    "random_erasing_on", "margin", "d_pn_p50", "d_pn_hinge_active", "base_kind", "eval_mode",
                    "eval_size", "lpips", "lpips_fingerprint", "lpips_reason")
# The LPIPS conventions of cascade.lpips_score, for captions (reports import no torch; a test
# keeps the names equal to cascade.config.LPIPS_CONVENTIONS).
LPIPS_TEXT = {
    "flare7k": "[0, 1] inputs without normalize=True, as Flare7K's evaluate.py computes it for "
               "its published numbers",
    "standard": "inputs scaled to [-1, 1] (normalize=True), the range LPIPS is calibrated for",
}


# -- tables as DataFrames ----------------------------------------------------------------------
def row_keys(cells: pd.DataFrame) -> list[tuple[str, int | None, float | None]]:
    """Table rows in paper order: the reference, the control (the cascade at 0 steps), then k
    ascending x λ in the sweep's order."""
    keys: list[tuple[str, int | None, float | None]] = []
    for kind in EVAL_ONLY_KINDS:
        if (cells["kind"] == kind).any():
            keys.append((kind, None, None))
    ours = cells[cells["kind"] == "cascade"]
    # Grid λ in first-appearance (plan) order; λ a search sampled after them, high to low.
    grid = list(dict.fromkeys(ours.loc[~ours["sampled"], "lambda_"].tolist()))
    lambdas = grid + sorted(set(ours["lambda_"]) - set(grid), reverse=True)
    for k in sorted(ours["k"].dropna().unique()):
        present = set(ours.loc[ours["k"] == k, "lambda_"])
        keys.extend(("cascade", int(k), float(lam)) for lam in lambdas if lam in present)
    return keys


def _select(cells: pd.DataFrame, key: tuple[str, int | None, float | None]) -> pd.DataFrame:
    method, k, lambda_ = key
    if method in EVAL_ONLY_KINDS:
        return cells[cells["kind"] == method]
    return cells[(cells["kind"] == "cascade") & (cells["k"] == k)
                 & np.isclose(cells["lambda_"].astype(float), lambda_)]


def table1_frame(sweep: SweepResults) -> pd.DataFrame:
    """Tidy Table 1: one row per (method, k, lambda_), full-precision means, stds and metadata.

    Columns: method, k, lambda_, METRICS, lpips_entire, <metric>_std (lpips_entire_std too),
    n_seeds, n_planned, status (done, partial, failed, stopped, pending), seeds, trial_ids, shared
    (λ=0 trial shown under both k), error, META_COLUMNS and FIDELITY_COLUMNS. Rows that have no
    result keep NaN metrics (never dropped, never 0); lpips_entire is NaN also where the trials
    had no LPIPS weights (lpips_reason says why).
    """
    rows = []
    for key in row_keys(sweep.cells):
        group = _select(sweep.cells, key)
        errors = group.loc[group["status"] == "failed", "error"].dropna().unique()
        rows.append({"method": key[0], "k": key[1], "lambda_": key[2],
                     **stats.aggregate_seeds(group), **_lpips_over_seeds(group),
                     "error": "; ".join(errors) or None, **describe_trials(sweep, group),
                     **distance_summary(sweep, group)})
    frame = pd.DataFrame(rows)
    frame["k"] = frame["k"].astype("Int64")
    values = [*METRICS, LPIPS_METRIC]
    order = ["method", "k", "lambda_", *values, *(m + "_std" for m in values), "n_seeds",
             "n_planned", "status", "seeds", "trial_ids", "shared", "error", *META_COLUMNS,
             *FIDELITY_COLUMNS]
    return frame[order]


def _lpips_over_seeds(cells: pd.DataFrame) -> dict[str, float]:
    """lpips_entire mean and sample std (ddof=1; NaN below 2) over a row's finished trials that
    have it, as `stats.aggregate_seeds` does for the paper's metrics."""
    trials = cells.drop_duplicates("trial_id")
    values = trials.loc[trials["status"] == "done", LPIPS_METRIC].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    return {LPIPS_METRIC: float(values.mean()) if values.size else np.nan,
            LPIPS_METRIC + "_std": float(values.std(ddof=1)) if values.size >= 2 else np.nan}


def diff_frame(sweep: SweepResults, *, n_resamples: int = stats.N_RESAMPLES,
                seed: int = stats.BOOTSTRAP_SEED, flag_on_image_noise: bool = False
                ) -> pd.DataFrame:
    """Δ vs the reference per non-reference row and metric, with intervals over seeds and images.

    Columns: method, k, lambda_, metric, `stats.DIFF_COLUMNS` (diff: ours - reference, the mean
    over the finished seeds and paired images; its 95% t interval with the seed variance, se, df,
    p-value; n_images, n_seeds, seed_variance_measured, excludes_zero, flagged (what diff.tex and
    the Δ figure mark; one seed: only with `flag_on_image_noise`), the images-only bootstrap
    interval, pairing), `stats.FAMILY_COLUMNS` (Holm over the table's comparisons), trial_ids,
    then `stats.POWER_COLUMNS` (results/README.md documents each). Rows without a finished trial
    (or reference) keep NaN.
    """
    cells = sweep.cells
    refs = cells[(cells["kind"] == "reference") & (cells["status"] == "done")]
    references = {(None if pd.isna(s) else int(s)): t for s, t in zip(refs["seed"], refs["trial_id"])}
    wide = stats.per_image_wide(sweep.per_image)
    rows = []
    for key in row_keys(cells):
        if key[0] == "reference":  # cascade cells and the control, each against the reference
            continue
        group = _select(cells, key).drop_duplicates("trial_id")
        done = group[group["status"] == "done"]
        trials = [(t, None if pd.isna(s) else int(s)) for t, s in zip(done["trial_id"], done["seed"])]
        diffs = stats.paired_differences(wide, trials, references)
        for row in stats.diff_rows(diffs, n_resamples=n_resamples, seed=seed,
                                   flag_on_image_noise=flag_on_image_noise):
            rows.append({"method": key[0], "k": key[1], "lambda_": key[2], **row,
                         "trial_ids": ";".join(t for t, _ in trials)})
    columns = ["method", "k", "lambda_", "metric", *stats.DIFF_COLUMNS, "trial_ids",
               *stats.POWER_COLUMNS]
    frame = stats.family_flags(pd.DataFrame(rows, columns=columns),
                               flag_on_image_noise=flag_on_image_noise)
    frame["k"] = frame["k"].astype("Int64")
    return frame[["method", "k", "lambda_", "metric", *stats.DIFF_COLUMNS,
                  *stats.FAMILY_COLUMNS, "trial_ids", *stats.POWER_COLUMNS]]


def read_paper(path: str | Path = PAPER_CSV) -> pd.DataFrame:
    """The published Table 1, with its `lambda` column renamed to our `lambda_`."""
    paper = pd.read_csv(path).rename(columns={"lambda": "lambda_"})
    paper["k"] = paper["k"].astype("Int64")
    return paper


def paper_vs_ours(table: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Our rows beside the published ones, aligned on (method, k, lambda_).

    Outer join: rows only we have (other λ) and rows only the paper has both appear, with NaN on
    the missing side. Columns: method, k, lambda_, n_seeds, status, demo, then for each metric
    <m>_paper, <m>_ours, <m>_diff (ours - paper).
    """

    def keyed(frame: pd.DataFrame) -> pd.DataFrame:
        # λ as a rounded float so 0.6 from YAML and 0.6 from the CSV meet.
        return frame.assign(lambda_=frame["lambda_"].astype(float).round(6))

    ours = keyed(table)[["method", "k", "lambda_", *METRICS, "n_seeds", "status", "demo"]]
    theirs = keyed(paper)[["method", "k", "lambda_", *METRICS]]
    merged = ours.merge(theirs, on=["method", "k", "lambda_"], how="outer",
                        suffixes=("_ours", "_paper"), sort=False)
    out = merged[["method", "k", "lambda_", "n_seeds", "status", "demo"]].copy()
    out["n_seeds"] = out["n_seeds"].astype("Int64")
    for m in METRICS:
        out[m + "_paper"] = merged[m + "_paper"]
        out[m + "_ours"] = merged[m + "_ours"]
        out[m + "_diff"] = merged[m + "_ours"] - merged[m + "_paper"]
    # Paper order: reference first, then k, then λ from 1.0 down.
    rank = out["method"].map({"reference": 0, "control": 1}).fillna(2)
    out = out.assign(_rank=rank, _lam=-out["lambda_"].fillna(2.0))
    out = out.sort_values(["_rank", "k", "_lam"], na_position="first", kind="stable")
    return out.drop(columns=["_rank", "_lam"]).reset_index(drop=True)


# -- LaTeX ------------------------------------------------------------------------------------
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def escape_latex(text: str) -> str:
    """Escape LaTeX special characters in free text (paths, error messages)."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def _lambda_text(value: float) -> str:
    return f"{value:.1f}" if round(value, 1) == value else f"{value:g}"


class _Notes:
    """Footnote markers a, b, c... assigned in order of first use."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def mark(self, text: str) -> str:
        letter = self.texts.setdefault(text, "abcdefghijklmnopqrstuvwxyz"[len(self.texts)])
        return f"$^{{{letter}}}$"

    def latex(self) -> str:
        return "\\\\\n".join(f"$^{{{letter}}}$\\,{text}" for text, letter in self.texts.items())


def _columns(title: dict[str, str], lpips: bool = False) -> pd.MultiIndex:
    """Column labels: Method, k, λ, the METRICS under their spanners, then (with `lpips`) the
    LPIPS group."""
    head = [("", "Method"), ("", "$k$"), ("", "$\\lambda$")]
    body = [(title[m.split("_")[0]], REGION_NAMES[m.split("_")[1]]) for m in METRICS]
    extra = [(title["lpips"], REGION_NAMES["entire"])] if lpips else []
    return pd.MultiIndex.from_tuples(head + body + extra)


def _render(frame: pd.DataFrame, bold: pd.DataFrame, *, caption: str, label: str,
            group_starts: list[int], notes: _Notes) -> str:
    """A booktabs `table` float via Styler.to_latex, with group rules and footnotes added.

    The value columns after Method, k, λ are the METRICS and optionally one LPIPS column."""
    n_values = frame.shape[1] - 3
    styler = frame.style.hide(axis="index").apply(
        lambda _: bold.map(lambda b: "textbf:--rwrap;" if b else ""), axis=None)
    latex = styler.to_latex(environment="table", position="tbp", position_float="centering",
                            hrules=True, caption=caption, label=label, multicol_align="c",
                            column_format="l" + "c" * 2 + "r" * n_values)
    lines = latex.splitlines()
    top = lines.index("\\toprule")
    # \cmidrule under the "PSNR | SSIM" (| LPIPS) spanners, as booktabs tables do.
    rules = "\\cmidrule(lr){4-6}\\cmidrule(lr){7-9}"
    if n_values > len(METRICS):
        rules += f"\\cmidrule(lr){{10-{3 + n_values}}}"
    lines.insert(top + 2, rules)
    body = lines.index("\\midrule") + 1
    for row in sorted(group_starts, reverse=True):  # bottom-up keeps earlier indices valid
        lines.insert(body + row, "\\midrule")
    end = lines.index("\\end{tabular}") + 1
    if notes.texts:
        lines.insert(end, "\\par\\smallskip\n{\\footnotesize\\raggedright\n" + notes.latex() + "\n}")
    needs = " and ".join(f"\\usepackage{{{name}}}" for name in LATEX_PACKAGES)
    header = f"% Generated by `python -m reports.table1`; do not edit by hand.\n% Needs {needs}."
    return header + "\n" + "\n".join(lines) + "\n"


def _group_starts(keys: list[tuple[str, Any, Any]]) -> list[int]:
    """Row indices where a new block (reference, k=1, k=2) begins."""
    return [i for i in range(1, len(keys)) if keys[i][:2] != keys[i - 1][:2]]


def _row_labels(table: pd.DataFrame, notes: _Notes) -> list[list[str]]:
    """Method, k, λ cells: the method and k only on the first row of their block."""
    labels, previous = [], None
    for row in table.itertuples(index=False):
        is_ref = row.method in EVAL_ONLY_KINDS  # no k or λ of its own
        block = (row.method, None if is_ref else int(row.k))
        method = ""
        if previous is None or block[0] != previous[0]:
            method = METHOD_LABELS.get(row.method, "Ours")
        k = "" if is_ref or block == previous else str(block[1])
        lam = "" if is_ref else _lambda_text(row.lambda_)
        if row.shared:
            lam += notes.mark("$\\lambda=0$ has no $L_\\mathrm{REG}$ term, so $k$ has no effect: "
                              "one trial is shown under both $k$.")
        if row.status == "partial":
            why = f"; failed: {escape_latex(_shorten(row.error))}" if row.error else ""
            lam += notes.mark(f"Mean of the {row.n_seeds} of {row.n_planned} seeds that finished{why}.")
        labels.append([method, k, lam])
        previous = block
    return labels


def _missing(row: Any, sweep_dir: str, notes: _Notes) -> str:
    """'---' with a footnote saying why a cell has no value."""
    if row.status == "failed":
        first = str(row.trial_ids).split(";")[0]
        why = f": {escape_latex(_shorten(row.error))}" if row.error else ""
        return "---" + notes.mark(f"Trial failed{why} (see {escape_latex(sweep_dir)}/trials/"
                                  f"{escape_latex(first)}/error.json).")
    if row.status == "stopped":
        return "---" + notes.mark("Stopped early by the scheduler; no final metrics.")
    if row.status in ("pending", "partial"):
        return "---" + notes.mark("No result yet: the trial has not finished.")
    return "---" + notes.mark("The trial finished but did not report this metric.")


def _no_lpips(row: Any) -> str:
    """Footnote of a finished row without LPIPS: the reason its trials recorded."""
    reason = getattr(row, "lpips_reason", "") or ""
    if not reason or pd.isna(reason):
        return "No LPIPS recorded: these trials ran before LPIPS was added to the evaluation."
    return f"LPIPS not computed: {escape_latex(brief_reason(reason))}."


def brief_reason(reason: str) -> str:
    """A recorded reason as a caption gives it: its first sentence, without the machine's paths
    (`cascade.lpips_score.missing_weights_message` names where this machine looked)."""
    first = reason.split(". ")[0].rstrip(".")
    return re.sub(r",? not found at \S+", " were not found on the machine that evaluated",
                  first)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def caption_text(table: pd.DataFrame, sweep: SweepResults, what: str) -> str:
    """Caption saying what the numbers are and, first and loudly, whether this is a demo."""
    first = table.iloc[0]
    n_images = sorted({str(f["n_images"]) for f in sweep.trials.values()
                       if f["status"] == "done" and f["n_images"] is not None})
    seeds = sorted({int(s) for s in sweep.cells.loc[sweep.cells["status"] == "done", "seed"].dropna()})
    max_seeds = int(table["n_seeds"].max())
    ours = table[table["method"] == "cascade"]
    meta = ours.iloc[0] if len(ours) else first
    parts = []
    if table["demo"].any():
        reasons = escape_latex(demo_reasons(table))
        parts.append(f"\\textbf{{DEMO RESULTS, NOT COMPARABLE TO THE PAPER ({reasons}).}}")
    parts.append(f"{what} Sweep \\texttt{{{escape_latex(sweep.name)}}}; "
                 f"test set: {escape_latex(first['test_set'])}"
                 + (f" ({escape_latex('/'.join(n_images))} images)" if n_images else "") + "; "
                 f"region protocol \\texttt{{{escape_latex(first['protocol'])}}}.")
    parts.append(f"Reference: the base Uformer alone ({escape_latex(first['checkpoint'])}).")
    if (table["method"] == "control").any():
        parts.append(CONTROL_TEXT)
    if meta["encoder"]:
        parts.append(f"Ours: cascaded fine-tuning, encoder {escape_latex(meta['encoder'])}, "
                     f"training data: {escape_latex(meta['dataset'])}.")
    if len(ours):
        training = "; ".join(_distinct(ours, "training"))
        if training:
            parts.append(f"Fine-tuning: {escape_latex(training)}.")
        parts.append(_loss_text(ours))
    parts.append(_evaluation_text(table))
    seed_text = ", ".join(map(str, seeds)) or "none"
    parts.append(f"Seeds: {seed_text}" + ("; mean $\\pm$ std over seeds." if max_seeds > 1 else
                                          "; seed variance not measured (1 seed)."))
    return " ".join(parts)


def _distinct(frame: pd.DataFrame, column: str) -> list[str]:
    """The distinct non-empty values of a text column, in row order (each may join several)."""
    values = [v for text in frame[column].dropna() for v in str(text).split("; ") if v]
    return list(dict.fromkeys(values))


def _span(values: pd.Series, fmt: str) -> str:
    """"a" or "a--b" over the finite values (formatted with `fmt`)."""
    finite = values.astype(float)
    finite = finite[np.isfinite(finite)]
    low, high = format(finite.min(), fmt), format(finite.max(), fmt)
    return low if low == high else f"{low}--{high}"


def _loss_text(ours: pd.DataFrame) -> str:
    """The loss conventions of the cascade rows and the margin beside the measured d(p, n)."""
    def tt(column: str) -> str:
        return ", ".join(f"\\texttt{{{escape_latex(v)}}}" for v in _distinct(ours, column)) or "unknown"

    erasing = [float(v) for v in _distinct(ours, "random_erasing")]
    where = {"background": "of the background, before the flare is added: in input and ground "
                           "truth", "input": "of the input only"}
    targets = "; ".join(where.get(t, t) for t in _distinct(ours, "random_erasing_on")) or "target unknown"
    erasing_text = ("unknown" if not erasing else "none" if erasing == [0.0]
                    else "$p = " + ", ".join(f"{p:g}" for p in erasing) + f"$ ({targets})")
    margins = ", ".join(_distinct(ours, "margin")) or "unknown"
    if ours["d_pn_p50"].notna().any():
        measured = (f"the measured $d(p, n) = \\lVert f(p) - f(n) \\rVert^2$ has median "
                    f"{_span(ours['d_pn_p50'], '.3g')} over training (rows with a triplet term; "
                    f"hinge active for {_span(100 * ours['d_pn_hinge_active'], '.0f')}\\,\\% of "
                    "samples)")
        if _margins_above(ours):  # the hinge [d(a,p) - d(a,n) + alpha]_+ stays open at a = p
            measured += (", below $\\alpha$: the triplet term cannot vanish even when the anchor "
                         "reaches the ground truth")
    else:
        measured = "$d(p, n)$ was not measured (no trial has a triplet term)"
    return (f"Loss: norms reduced by {tt('reduction')} per sample, encoder features "
            f"{tt('encoder_features')}, random erasing {erasing_text}; margin $\\alpha = {margins}$, "
            f"in the units of $d$; {measured}.")


def _margins_above(ours: pd.DataFrame) -> bool:
    """True when every row's margin exceeds its median d(p, n) (rows that measured one)."""
    rows = ours[ours["d_pn_p50"].notna()]
    try:
        margins = [max(float(v) for v in str(m).split("; ")) for m in rows["margin"]]
    except ValueError:  # no margin recorded
        return False
    return bool(len(rows)) and all(m > d for m, d in zip(margins, rows["d_pn_p50"]))


def _evaluation_text(table: pd.DataFrame) -> str:
    """Which official output path and LPIPS convention the numbers come from."""
    kinds = _distinct(table, "base_kind")
    how = {"flare7k": "light source re-blended from the input, as Flare7K's test.py for v1",
           "flare7kpp": "channels 0:3 as predicted, no light-source re-blend"}
    kind_text = "; ".join(f"\\texttt{{{escape_latex(k)}}} ({how.get(k, 'unknown kind')})"
                          for k in kinds) or "unknown"
    size = "/".join(_distinct(table, "eval_size")) or "?"
    modes = ", ".join(f"\\texttt{{{escape_latex(m)}}}" + (
        f" ({escape_latex(VIEW_TEXT[m].format(s=size))}; predicted and scored at that size)"
        if m in VIEW_TEXT else "") for m in _distinct(table, "eval_mode"))
    conventions = _distinct(table, "lpips")
    lpips = "; ".join(f"\\texttt{{{escape_latex(c)}}} convention ({escape_latex(LPIPS_TEXT.get(c, 'unknown'))})"
                      for c in conventions) or "convention unknown"
    return (f"Evaluation: base kind {kind_text}, mode {modes or 'unknown'}. LPIPS (AlexNet v0.1, "
            f"entire image, lower is better): {lpips}.")


def table1_latex(table: pd.DataFrame, *, caption: str, label: str = "tab:table1",
                 sweep_dir: str = "results/<sweep>") -> str:
    """Table 1 as LaTeX: paper rounding, mean ± std with seeds, best per column in bold.

    `table` is a `table1_frame`; `caption` is LaTeX (see `caption_text`); `sweep_dir` is quoted
    in footnotes that point at a failed trial's error.json. After the paper's columns, an LPIPS
    group (entire image, lower is better): "---" with a footnote saying why where a finished row
    has no LPIPS (no AlexNet weights offline).
    """
    notes = _Notes()
    labels = _row_labels(table, notes)
    cells, bold = [], []
    values_of = [*METRICS, LPIPS_METRIC]
    # Best among ours + reference, judged on the printed (rounded) values so ties all show bold.
    # The control is a check, not a method: it is never the best of a column.
    rounded = {m: table[m].where(table["method"] != "control").round(DECIMALS[m]) for m in values_of}
    best = {m: rounded[m].max() for m in METRICS}  # PSNR and SSIM: higher is better
    best[LPIPS_METRIC] = rounded[LPIPS_METRIC].min()  # a distance: lower is better
    for i, row in enumerate(table.itertuples(index=False)):
        values, flags = [], [False] * 3
        for m in values_of:
            mean, std = getattr(row, m), getattr(row, m + "_std")
            if pd.isna(mean):
                done = m == LPIPS_METRIC and not all(pd.isna(getattr(row, v)) for v in METRICS)
                values.append("---" + notes.mark(_no_lpips(row)) if done
                              else _missing(row, sweep_dir, notes))
                flags.append(False)
                continue
            text = f"{mean:.{DECIMALS[m]}f}"
            if row.n_seeds > 1 and pd.notna(std):
                # std in a smaller font keeps six mean ± std columns within a page.
                text += f"\\,{{\\scriptsize$\\pm${std:.{DECIMALS[m]}f}}}"
            values.append(text)
            flags.append(bool(rounded[m].iloc[i] == best[m]))
        cells.append(labels[i] + values)
        bold.append(flags)
    columns = _columns({"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}, lpips=True)
    keys = list(zip(table["method"], table["k"], table["lambda_"]))
    return _render(pd.DataFrame(cells, columns=columns), pd.DataFrame(bold, columns=columns),
                   caption=caption, label=label, group_starts=_group_starts(keys), notes=notes)


def diff_latex(diffs: pd.DataFrame, table: pd.DataFrame, *, caption: str,
                label: str = "tab:diff", sweep_dir: str = "results/<sweep>",
                flag_on_image_noise: bool = False) -> str:
    """Δ vs the reference as LaTeX: `+0.12 [+0.05, +0.20]*` per cell; SSIM in units of 1e-3.

    `diffs` is a `diff_frame`, `table` the matching `table1_frame` (row labels, statuses). A cell
    carries SIGNIFICANT where `flagged`, and HOLM too where `flagged_holm` (`diff_caption` says
    what they mean); with some rows at one seed, those rows get a footnote that their seed
    variance was not measured (`flag_on_image_noise`: and that they are marked all the same).
    """
    notes = _Notes()
    ours = table[table["method"] != "reference"].reset_index(drop=True)  # control + cascade rows
    labels = _row_labels(ours, notes)
    if not _one_seed_only(diffs):  # all rows at one seed: diff_caption says it once
        for i, row in enumerate(ours.itertuples(index=False)):
            rows = diffs[_same_row(diffs, row)]
            if len(rows) and rows["diff"].notna().any() and not rows["seed_variance_measured"].any():
                labels[i][2] += notes.mark(_one_seed_text(flag_on_image_noise))

    cells = []
    for i, row in enumerate(ours.itertuples(index=False)):
        values = []
        for m in METRICS:
            hit = diffs[_same_row(diffs, row) & (diffs["metric"] == m)]
            d = hit.iloc[0] if len(hit) else None
            if d is None or pd.isna(d["diff"]):
                values.append(_missing(row, sweep_dir, notes) if pd.isna(getattr(row, m))
                              else "---" + notes.mark("No per-image metrics to pair with the reference."))
                continue
            s = DIFF_SCALE[m]
            text = f"${d['diff'] * s:+.2f}$"  # math mode: a real minus sign
            if pd.notna(d["ci_low"]):
                text += f"\\,{{\\scriptsize$[{d['ci_low'] * s:+.2f}, {d['ci_high'] * s:+.2f}]$}}"
            values.append(text + (SIGNIFICANT if d["flagged"] else "")
                          + (HOLM if d.get("flagged_holm", False) else ""))
        cells.append(labels[i] + values)
    columns = _columns({"psnr": "$\\Delta$PSNR (dB)", "ssim": "$\\Delta$SSIM ($\\times 10^{-3}$)"})
    frame = pd.DataFrame(cells, columns=columns)
    keys = list(zip(ours["method"], ours["k"], ours["lambda_"]))
    bold = pd.DataFrame(False, index=frame.index, columns=columns)
    return _render(frame, bold, caption=caption, label=label, group_starts=_group_starts(keys),
                   notes=notes)


def _same_row(diffs: pd.DataFrame, row: Any) -> pd.Series:
    """Which rows of a diff frame belong to table row `row` (its method, and its k and λ)."""
    same = diffs["method"] == row.method
    if row.method in EVAL_ONLY_KINDS:
        return same
    return same & (diffs["k"] == row.k).fillna(False) & np.isclose(
        diffs["lambda_"].astype(float), row.lambda_)


def _one_seed_only(diffs: pd.DataFrame) -> bool:
    """True when no row with a Δ measured the seed variance (every one had a single seed)."""
    rows = diffs[diffs["diff"].notna()]
    return bool(len(rows)) and not rows["seed_variance_measured"].astype(bool).any()


def _one_seed_text(flag_on_image_noise: bool) -> str:
    """What a one-seed row's interval is, and whether it may carry a mark."""
    option = "\\texttt{-{}-flag-on-image-noise}"
    return ("Seed variance not measured (1 seed): the interval is over test images alone, "
            + (f"marked on image noise alone as {option} asked."
               if flag_on_image_noise else f"so it is not marked (unless {option})."))


def diff_caption(diffs: pd.DataFrame, *, flag_on_image_noise: bool = False) -> str:
    """What diff.tex shows, how its intervals are made and what its marks mean; prefix for
    `caption_text`."""
    n_images = int(diffs["n_images"].max()) if len(diffs) else 0
    df = diffs.loc[diffs["seed_variance_measured"].astype(bool), "df"].dropna() if len(diffs) else []
    df_text = (f", here {_span(df, '.1f')}" if len(df) else "")
    text = (f"Difference to the reference (ours $-$ Uformer): the mean over the seeds and up to "
            f"{n_images} test images paired by file name, with 95\\% $t$ intervals whose variance "
            f"holds the seed and the image variance (seeds $\\times$ images random effects; "
            f"Satterthwaite degrees of freedom{df_text}). {SIGNIFICANT}: the interval excludes 0 "
            f"(one comparison at a time).")
    family = int(diffs["family_size"].max()) if len(diffs) and "family_size" in diffs else 0
    if family:
        text += (f" {HOLM}: also after Holm's correction over the {family} distinct comparisons "
                 f"of this table (rows $\\times$ metrics; family-wise error 5\\%).")
    if _one_seed_only(diffs):
        text += " " + _one_seed_text(flag_on_image_noise)
    return text


def _label(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


# -- writing ----------------------------------------------------------------------------------
def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write a CSV atomically (NaN as an empty field)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def build_reports(sweep_dir: str | Path, *, paper: bool = True,
                  cells: list[dict[str, Any]] | None = None, out_dir: str | Path | None = None,
                  flag_on_image_noise: bool = False) -> list[Path]:
    """Write every report for `results/<sweep>` into `out_dir` (default: the sweep folder) and
    return the files written. `cells`: which trials and evaluations (default: the recorded plan).
    `flag_on_image_noise`: mark one-seed differences whose interval over images excludes 0 (off:
    their seed variance is not measured, so nothing supports a mark).

    Raises UserError (one line) when there is nothing to report yet.
    """
    from reports import figures  # matplotlib only when writing, not for the table functions

    sweep = load_sweep(sweep_dir, cells)
    root = Path(out_dir) if out_dir is not None else sweep.root
    table = table1_frame(sweep)
    diffs = diff_frame(sweep, flag_on_image_noise=flag_on_image_noise)
    where, label = str(root), _label(sweep.name)
    # Which code and inputs produced each row: columns of the CSV, a caption sentence, warnings.
    prov = table_provenance.provenance_columns(sweep, table)
    for line in table_provenance.warnings(prov):
        print(f"warning: {sweep.name}: {line}", file=sys.stderr)
    code = table_provenance.caption(prov)
    written = [write_csv(pd.concat([table, prov], axis=1), root / "table1.csv")]
    atomic_write_text(root / "table1.tex", table1_latex(
        table, caption=" ".join(filter(None, [caption_text(table, sweep, TABLE1_WHAT), code])),
        label=f"tab:table1-{label}", sweep_dir=where))
    written.append(root / "table1.tex")
    written.append(write_csv(diffs, root / "diff.csv"))
    if (table["method"] == "cascade").any():
        what = diff_caption(diffs, flag_on_image_noise=flag_on_image_noise)
        atomic_write_text(root / "diff.tex", diff_latex(
            diffs, table, caption=caption_text(table, sweep, what), label=f"tab:diff-{label}",
            sweep_dir=where, flag_on_image_noise=flag_on_image_noise))
        written.append(root / "diff.tex")
    if paper:
        written.append(write_csv(paper_vs_ours(table, read_paper()), root / "paper_vs_ours.csv"))
    written += figures.write_figures(sweep, table, diffs, root / "figures", anchor=PAPER_ANCHOR)
    return written


@cli_errors
def main(argv: list[str] | None = None) -> None:
    """CLI: write the reports of one sweep folder and list them."""
    parser = argparse.ArgumentParser(prog="python -m reports.table1", description=__doc__.split("\n")[0])
    parser.add_argument("--sweep-dir", type=Path, required=True, help="results/<sweep> folder")
    parser.add_argument("--no-paper", action="store_true", help="skip paper_vs_ours.csv")
    parser.add_argument("--flag-on-image-noise", action="store_true",
                        help="mark one-seed differences on image noise alone (their seed "
                             "variance is not measured; off by default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in build_reports(args.sweep_dir, paper=not args.no_paper,
                              flag_on_image_noise=args.flag_on_image_noise):
        print(path)


if __name__ == "__main__":
    main()
