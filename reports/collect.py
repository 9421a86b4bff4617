"""Read a sweep's results tree (docs/design.md, "Results on disk") into DataFrames.

Nothing here computes statistics; it only turns `sweep.json` and `trials/<id>/`, read through
`orchestrator.record` (the one reader of the results folder), into:
- `cells`: one row per planned cell (λ=0 cells that share a trial keep one row each),
- `per_image`: per-image metrics of every finished trial, images keyed by file stem,
- `trials`: per trial id, the merged config/metrics facts used in captions.
Missing or failed trials stay in `cells` with a status; they are never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cascade.errors import UserError
from orchestrator.record import SweepRecord

# The columns of the paper's Table 1, in its order (cascade.metrics.summarize keys).
METRICS = ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak", "ssim_glare")
# Differences to the reference are shown (diff.tex, diff_vs_lambda) in dB and in 1e-3 SSIM units.
DIFF_SCALE = {m: 1.0 if m.startswith("psnr") else 1e3 for m in METRICS}
PER_IMAGE_COLUMNS = ("image", "region", "metric", "value")
# Trial facts quoted in captions; read from metrics.json, then config.json, then the plan.
FACT_KEYS = ("protocol", "encoder", "encoder_pretrained", "data", "test_data", "test_data_dir",
             "checkpoint", "n_images", "seed")
# "stopped": ended early by the scheduler (stopped.json), never resumed; "pending": not finished
# (not started, running or interrupted).
STATUSES = ("done", "failed", "stopped", "pending")
# Why a table is a demo, in the order captions list them.
DEMO_REASONS = ("random-weight encoder", "encoder weights unknown", "procedural training data",
                "procedural base network", "procedural test set")


@dataclass(frozen=True)
class SweepResults:
    """Everything `reports/` reads from one `results/<sweep>/` folder."""

    root: Path
    name: str
    # One row per plan cell: cell, trial_id, kind, k, lambda_, seed, sampled, status, error,
    # shared, and the METRICS columns (NaN unless status == "done").
    cells: pd.DataFrame
    # image (stem), region, metric, value, trial_id; finished trials only.
    per_image: pd.DataFrame
    # trial_id -> {FACT_KEYS...}: what the trial actually ran with (None where unknown).
    trials: dict[str, dict[str, Any]]

    def trial_dir(self, trial_id: str) -> Path:
        """Folder of one trial."""
        return self.root / "trials" / trial_id


def load_sweep(sweep_dir: str | Path) -> SweepResults:
    """Read `sweep_dir` (a `results/<sweep>` folder).

    Raises UserError (one line) when there is no plan, the plan is malformed, or no trial finished.
    """
    root = Path(sweep_dir)
    record = SweepRecord(root)
    plan = record.read_plan()
    if plan is None:
        raise UserError(f"{_shown(root)}: no sweep results (run `make sweep` first)")
    raw_cells, plan_path = plan["cells"], record.plan_path

    rows, trials, per_image = [], {}, []
    for i, cell in enumerate(raw_cells):
        rows.append(_plan_row(i, cell, plan_path))
    cells = pd.DataFrame(rows)
    cells["k"] = cells["k"].astype("Int64")
    cells["seed"] = cells["seed"].astype("Int64")
    for trial_id, plan_config in cells.groupby("trial_id", sort=False)["config"].first().items():
        status, error, metrics = _trial_state(record, trial_id)
        trials[trial_id] = {"status": status, "error": error, "metrics": metrics,
                            **_facts(record.read_config(trial_id), plan_config, metrics)}
        if status == "done":
            per_image.append(_read_per_image(record.per_image_path(trial_id), trial_id))

    cells["status"] = cells["trial_id"].map(lambda t: trials[t]["status"])
    cells["error"] = cells["trial_id"].map(lambda t: trials[t]["error"])
    # λ=0 cells of k=1 and k=2 are one trial (no L_REG term); both rows show it, with a footnote.
    cells["shared"] = cells.groupby("trial_id")["trial_id"].transform("size") > 1
    for m in METRICS:
        cells[m] = cells["trial_id"].map(lambda t, m=m: _as_float(trials[t]["metrics"].get(m)))
    cells = cells.drop(columns="config")

    if not (cells["status"] == "done").any():
        counts = cells.drop_duplicates("trial_id")["status"].value_counts()
        parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
        raise UserError(f"{_shown(root)}: no finished trials yet ({parts}); run `make sweep` first")
    frame = (pd.concat(per_image, ignore_index=True) if per_image
             else pd.DataFrame(columns=[*PER_IMAGE_COLUMNS, "trial_id"]))
    return SweepResults(root=root, name=str(plan.get("name") or root.name), cells=cells,
                        per_image=frame, trials=trials)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when inside it (short error messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _plan_row(i: int, cell: Any, where: Path) -> dict[str, Any]:
    """One plan cell -> flat row; k / lambda_ / seed are None for a reference without them."""
    if not isinstance(cell, dict) or not isinstance(cell.get("trial_id"), str):
        raise UserError(f"{where}: cells[{i}] needs a string 'trial_id'")
    config = cell.get("config") or {}
    kind = cell.get("kind", config.get("kind", "cascade"))
    if kind not in ("cascade", "reference"):
        raise UserError(f"{where}: cells[{i}] kind={kind!r}; expected cascade or reference")

    def field(key: str) -> Any:
        return cell[key] if key in cell else config.get(key)

    k, lambda_, seed = field("k"), field("lambda_"), field("seed")
    if kind == "cascade" and (k is None or lambda_ is None):
        raise UserError(f"{where}: cells[{i}] (cascade) needs k and lambda_")
    return {
        "cell": i,
        "trial_id": cell["trial_id"],
        "kind": kind,
        # The reference has no k/λ of its own: keep NaN so it never lands in a cascade row.
        "k": pd.NA if kind == "reference" or k is None else int(k),
        "lambda_": np.nan if kind == "reference" or lambda_ is None else float(lambda_),
        "seed": pd.NA if seed is None else int(seed),
        # Trials a search algorithm sampled (not grid cells); rows ordered after the grid's.
        "sampled": isinstance(cell.get("sampled"), dict),
        "config": config,
    }


def _trial_state(record: SweepRecord, trial_id: str) -> tuple[str, str | None, dict[str, Any]]:
    """(status, first error line, metrics) in STATUSES terms: running and interrupted trials are
    "pending" here; an unreadable metrics.json is a UserError naming it, never a silent gap."""
    metrics = record.read_metrics(trial_id)
    if metrics is not None:
        return "done", None, metrics
    status = record.status(trial_id)
    if status.state in ("failed", "stopped"):
        return status.state, status.error, {}
    return "pending", None, {}


def _facts(config: dict[str, Any], plan_config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Caption facts for one trial: what it ran with (metrics) > its resolved config > the plan."""
    sources = [metrics, config, plan_config]
    return {key: next((s[key] for s in sources if key in s), None) for key in FACT_KEYS}


def _read_per_image(path: Path, trial_id: str) -> pd.DataFrame:
    """per_image.csv of one trial; `image` reduced to its stem so trials pair by image."""
    if not path.is_file():
        return pd.DataFrame(columns=[*PER_IMAGE_COLUMNS, "trial_id"])
    try:
        # Stems like "000000" must stay strings: as integers they would never match sample files.
        frame = pd.read_csv(path, dtype={"image": str})
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable CSV ({exc})") from None
    missing = [c for c in PER_IMAGE_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(PER_IMAGE_COLUMNS)}")
    frame = frame[list(PER_IMAGE_COLUMNS)].copy()
    frame["image"] = frame["image"].astype(str).map(lambda name: Path(name).stem)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["trial_id"] = trial_id
    return frame


def _as_float(value: Any) -> float:
    """A summary value as float; NaN for missing or non-numeric (never 0)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def describe_trials(sweep: SweepResults, cells: pd.DataFrame) -> dict[str, Any]:
    """What a set of trials ran with, as caption-ready strings, plus the demo flag.

    A table from a random-weight encoder, procedural data or a procedural base network is a demo
    and must say so: `demo` is True and `demo_reasons` lists why.
    """
    ids = list(dict.fromkeys(cells["trial_id"]))
    done = [t for t in ids if sweep.trials[t]["status"] == "done"] or ids
    facts = [sweep.trials[t] for t in done]
    cascade = [f for t, f in zip(done, facts) if (cells.loc[cells["trial_id"] == t, "kind"] == "cascade").any()]

    def joined(values: list[Any]) -> str:
        return "; ".join(dict.fromkeys(str(v) for v in values))

    reasons: list[str] = []
    pretrained = [f["encoder_pretrained"] for f in cascade]
    if any(p is not True for p in pretrained):
        reasons.append("random-weight encoder" if False in pretrained else "encoder weights unknown")
    if cascade and any(f["data"] is None for f in cascade):
        reasons.append("procedural training data")
    if any(f["checkpoint"] is None for f in facts):
        reasons.append("procedural base network")
    if any(f["test_data"] is None for f in facts):
        reasons.append("procedural test set")
    encoders = [f"{f['encoder']} ({_pretrained_text(f['encoder_pretrained'])})" for f in cascade]
    return {
        "protocol": joined([f["protocol"] for f in facts]),
        "encoder": joined(encoders) if cascade else "",
        "encoder_pretrained": joined(pretrained) if cascade else "",
        "dataset": joined([f["data"] or "procedural benchmark" for f in cascade]) if cascade else "",
        "test_set": joined([f["test_data"] or "procedural test set" for f in facts]),
        "checkpoint": joined([f["checkpoint"] or "procedural base" for f in facts]),
        "demo": bool(reasons),
        "demo_reasons": "; ".join(reasons),
    }


def _pretrained_text(value: Any) -> str:
    return {True: "pretrained", False: "random weights"}.get(value, "weights unknown")


def demo_reasons(table: pd.DataFrame) -> str:
    """The distinct `demo_reasons` of a Table 1 frame's rows, in DEMO_REASONS order."""
    found = {r for text in table["demo_reasons"].dropna() for r in str(text).split("; ") if r}
    return "; ".join(r for r in (*DEMO_REASONS, *sorted(found - set(DEMO_REASONS))) if r in found)
