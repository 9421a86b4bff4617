"""Which evaluation reading reproduces the paper's reference row? `make reference-check`.

    python -m reports.reference_check --space search_spaces/table1.yaml --data DIR \
        --checkpoint PTH --test-data DIR [--modes m1 m2 ...] [--protocols masked flare7k] \
        [--eval-size 128] [--results results]

The paper's Table 1 gives the reference Uformer's six numbers (PSNR 23.74 / 30.28 / 27.79, SSIM
0.8692 / 0.9646 / 0.9269 over entire / streak / glare) but not how its 512 px test images became
"images of size 128x128", nor its region definitions. This evaluates the space's reference network
once under every evaluation mode x region protocol (`cascade.reference_check.measure_readings`)
and puts each reading's numbers beside the paper's, with their distance

    distance = sqrt(mean over the six numbers of ((ours - paper) / scale)^2),
    scale = 1 dB for PSNR and 0.01 for SSIM

(one unit on each scale is about the spread of the paper's own cells around its reference: up to
0.65 dB and 0.002 SSIM). The reading with the smallest distance is "nearest"; a distance well
above 1 means no reading reproduces the paper's setup (another checkpoint, test set or metric).

Writes `<results>/<name>/reference_check.csv` (one row per reading, nearest first) and
`reference_check.md` (the same as a readable table with the verdict), atomically, and prints the
table. On the procedural demo (`--space search_spaces/demo.yaml --eval-size 32`) it runs on the CPU
(measured: 5m09s on 2 busy cores, the demo base's first build included; under a minute once it is
cached); its distances say nothing about the paper (another network and test set).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import pandas as pd

from cascade.errors import UserError, cli_errors
from cascade.io import atomic_write_text
from reports.collect import METRICS
from reports.table1 import read_paper, write_csv

SCALE = {m: 1.0 if m.startswith("psnr") else 0.01 for m in METRICS}
"""Units of the distance: 1 dB of PSNR weighs as 0.01 of SSIM."""


def paper_reference() -> dict[str, float]:
    """The paper's reference row (reports/data/paper_table1.csv), METRICS -> value."""
    paper = read_paper()
    row = paper[paper["method"] == "reference"].iloc[0]
    return {m: float(row[m]) for m in METRICS}


def compare(measured: pd.DataFrame, paper: dict[str, float]) -> pd.DataFrame:
    """`measured` (cascade.reference_check.measure_readings) beside the paper's reference row.

    Adds, per metric, `<m>_paper` and `<m>_diff` (ours - paper), then `distance` (module
    docstring), `max_abs_psnr_diff` (dB), `max_abs_ssim_diff`, and `nearest` (True on the
    smallest distance); rows sorted nearest first. A reading with a missing region (NaN) has a
    NaN distance and sorts last."""
    out = measured.copy()
    z = []
    for m in METRICS:
        out[m + "_paper"] = paper[m]
        out[m + "_diff"] = out[m].astype(float) - paper[m]
        z.append((out[m + "_diff"] / SCALE[m]) ** 2)
    out["distance"] = (sum(z) / len(z)) ** 0.5
    out["max_abs_psnr_diff"] = out[[m + "_diff" for m in METRICS if m.startswith("psnr")]].abs().max(axis=1)
    out["max_abs_ssim_diff"] = out[[m + "_diff" for m in METRICS if m.startswith("ssim")]].abs().max(axis=1)
    out = out.sort_values("distance", na_position="last", kind="stable").reset_index(drop=True)
    out["nearest"] = False
    if out["distance"].notna().any():
        out.loc[0, "nearest"] = True
    return out


def reading_name(row: pd.Series) -> str:
    """`resize-bilinear@128 / masked`: a reading as the table names it."""
    size = row["eval_size"]
    mode = row["eval_mode"] + ("" if size is None or pd.isna(size) else f"@{int(size)}")
    return f"{mode} / {row['protocol']}"


def markdown(compared: pd.DataFrame, paper: dict[str, float], where: str) -> str:
    """The comparison as a Markdown table (paper's row first) and a one-line verdict."""
    head = ["reading", *METRICS, "distance"]
    lines = [f"# Reference check: {where}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| paper (Song & Bae, Table 1) | " + " | ".join(_fmt(m, paper[m]) for m in METRICS) + " | |"]
    for _, row in compared.iterrows():
        cells = [reading_name(row), *(_fmt(m, row[m]) for m in METRICS), _fmt("distance", row["distance"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", verdict(compared)]
    if "reason" in compared:
        for _, row in compared[compared["reason"].notna()].drop_duplicates("eval_mode").iterrows():
            lines.append(f"Not measured: {row['eval_mode']} ({row['reason']}).")
    lines += ["",
              "distance: RMS over the six numbers of (ours - paper), in units of 1 dB (PSNR) and "
              "0.01 (SSIM)."]
    return "\n".join(lines) + "\n"


def verdict(compared: pd.DataFrame) -> str:
    """One line: the nearest reading and how near it is."""
    if not compared["nearest"].any():
        return "No reading has all six numbers (a region is missing from the test set)."
    best = compared.iloc[0]
    close = ("within the paper's own cell-to-cell spread" if best["distance"] <= 1
             else "no reading reproduces the paper's reference row")
    return (f"Nearest: {reading_name(best)}, distance {best['distance']:.2f} "
            f"(max |dPSNR| {best['max_abs_psnr_diff']:.2f} dB, max |dSSIM| "
            f"{best['max_abs_ssim_diff']:.4f}): {close}.")


def _fmt(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2f}" if metric.startswith("psnr") or metric == "distance" else f"{value:.4f}"


def _parser() -> argparse.ArgumentParser:
    from cascade.config import EVAL_MODES, PROTOCOLS

    p = argparse.ArgumentParser(prog="python -m reports.reference_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--space", type=Path, default=Path("search_spaces/table1.yaml"),
                   help="search space whose reference cell is checked (default: %(default)s)")
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="results root; writes <results>/<name>/reference_check.* (default: %(default)s)")
    p.add_argument("--data", help="Flare7K root (sets `data`)")
    p.add_argument("--backgrounds", help="flare-free backgrounds (sets `backgrounds`)")
    p.add_argument("--test-data", help="test folder with input/ gt/ mask/")
    p.add_argument("--checkpoint", help="the pre-trained Uformer .pth")
    p.add_argument("--base-kind", choices=("flare7k", "flare7kpp"), help="which release it is")
    p.add_argument("--modes", nargs="+", choices=EVAL_MODES, default=list(EVAL_MODES),
                   help="evaluation modes to try (default: all)")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                   help="region protocols to try (default: all)")
    p.add_argument("--eval-size", type=int,
                   help="side of the views of the resize/crop/tiles modes (default: the space's "
                        "eval_size, 128 unless it sets one)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> pd.DataFrame:
    """CLI: measure, compare, write, print."""
    from cascade.reference_check import measure_readings
    from orchestrator.space import load_space

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    space = load_space(args.space, data=args.data, backgrounds=args.backgrounds,
                       test_data=args.test_data, checkpoint=args.checkpoint,
                       base_kind=args.base_kind)
    refs = [c for c in space.cells if c.kind == "reference"]
    if not refs:
        raise UserError(f"{args.space}: no reference cell (set `reference: true`)")
    cfg = refs[0].config
    size = args.eval_size if args.eval_size is not None else cfg.eval_size
    measured = measure_readings(cfg, args.modes, args.protocols, size)
    paper = paper_reference()
    compared = compare(measured, paper)
    root = args.results / space.name
    write_csv(compared, root / "reference_check.csv")
    text = markdown(compared, paper, f"{space.name}, {cfg.checkpoint or 'procedural base'}, "
                                     f"{cfg.test_data or 'the space test set'}")
    atomic_write_text(root / "reference_check.md", text)
    print(text, end="")
    print(f"wrote {root / 'reference_check.csv'} and {root / 'reference_check.md'}", file=sys.stderr)
    return compared


if __name__ == "__main__":
    main()
