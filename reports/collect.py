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

from cascade.config import KINDS
from cascade.errors import UserError
from orchestrator.record import SweepRecord

# The columns of the paper's Table 1, in its order (cascade.metrics.summarize keys).
METRICS = ("psnr_entire", "psnr_streak", "psnr_glare", "ssim_entire", "ssim_streak", "ssim_glare")
# Differences to the reference are shown (diff.tex, diff_vs_lambda) in dB and in 1e-3 SSIM units.
DIFF_SCALE = {m: 1.0 if m.startswith("psnr") else 1e3 for m in METRICS}
PER_IMAGE_COLUMNS = ("image", "region", "metric", "value")
# LPIPS over the entire image (cascade.evaluate): not in the paper's Table 1, an extra column group.
LPIPS_METRIC = "lpips_entire"
# Trial facts quoted in captions; read from metrics.json, then config.json, then the plan.
# The loss conventions (reduction, encoder_features, margin, random_erasing) and the evaluation
# path (base_kind, eval_mode, lpips: the LPIPS convention) are what issue 17 made explicit; d_pn
# (the measured d(p, n), a dict) and the lpips_* provenance exist in metrics.json only.
FACT_KEYS = ("protocol", "encoder", "encoder_pretrained", "data", "test_data", "test_data_dir",
             "checkpoint", "n_images", "seed", "reduction", "encoder_features", "margin",
             "random_erasing", "random_erasing_on", "base_kind", "eval_mode", "eval_size", "lpips",
             "lpips_weights_source", "lpips_fingerprint", "lpips_reason", "d_pn",
             # the settings the paper leaves open, for the caption (`training_text`)
             "data_loader", "optimizer", "lr", "momentum", "weight_decay", "schedule", "steps",
             "batch_size", "crop")
# "stopped": ended early by the scheduler (stopped.json), never resumed; "pending": not finished
# (not started, running or interrupted).
# A table row's status, from the one vocabulary of trial states (orchestrator.record.STATES):
# a table needs only whether a trial finished, failed, stopped early or is not finished yet.
REPORT_STATUS = {"done": "done", "failed": "failed", "stopped": "stopped", "running": "pending",
                 "interrupted": "pending", "trained": "pending", "pending": "pending"}
STATUSES = tuple(dict.fromkeys(REPORT_STATUS.values()))  # done, failed, stopped, pending
# Why a table is a demo, in the order captions list them.
DEMO_REASONS = ("random-weight encoder", "encoder weights unknown", "procedural training data",
                "procedural base network", "procedural test set")


@dataclass(frozen=True)
class SweepResults:
    """Everything `reports/` reads from one `results/<sweep>/` folder."""

    root: Path
    name: str
    # One row per plan cell: cell, trial_id, kind, k, lambda_, seed, sampled, status, error,
    # shared, and the METRICS and LPIPS_METRIC columns (NaN unless status == "done"; LPIPS also
    # NaN when the trial had no LPIPS weights).
    cells: pd.DataFrame
    # image (stem), region, metric, value, trial_id; finished trials only.
    per_image: pd.DataFrame
    # trial_id -> {FACT_KEYS...}: what the trial actually ran with (None where unknown).
    trials: dict[str, dict[str, Any]]
    record: SweepRecord | None = None

    def eval_dir(self, trial_id: str) -> Path:
        """The evaluation folder these results show for a trial (samples/, per_image.csv):
        `trials/<id>/evals/<eval_id>/`, not the trial's own folder."""
        record = self.record or SweepRecord(self.root)
        return record.eval_dir(trial_id, self.trials[trial_id]["eval_id"])


def load_sweep(sweep_dir: str | Path, cells: list[dict[str, Any]] | None = None) -> SweepResults:
    """Read `sweep_dir` (a `results/<sweep>` folder) for `cells` (sweep.json entries: each names a
    trial and one of its evaluations; default: the plan the last run recorded).

    Raises UserError (one line) when there is no plan, the plan is malformed, or no trial finished.
    """
    root = Path(sweep_dir)
    record = SweepRecord(root)
    plan = record.read_plan()
    if plan is None:
        raise UserError(f"{_shown(root)}: no sweep results (run `make sweep` first)")
    raw_cells, plan_path = (plan["cells"] if cells is None else cells), record.plan_path

    rows, trials, per_image = [], {}, []
    for i, cell in enumerate(raw_cells):
        rows.append(_plan_row(i, cell, plan_path))
    cells = pd.DataFrame(rows)
    cells["k"] = cells["k"].astype("Int64")
    cells["seed"] = cells["seed"].astype("Int64")
    evals = dict(zip(cells["trial_id"], cells["eval_id"]))
    for trial_id, plan_config in cells.groupby("trial_id", sort=False)["config"].first().items():
        eval_id = evals[trial_id]
        status, error, metrics = _trial_state(record, trial_id, eval_id)
        trials[trial_id] = {"status": status, "error": error, "metrics": metrics, "eval_id": eval_id,
                            **_facts(record.read_config(trial_id, eval_id), plan_config, metrics)}
        if status == "done":
            per_image.append(_read_per_image(record.per_image_path(trial_id, eval_id), trial_id))

    cells["status"] = cells["trial_id"].map(lambda t: trials[t]["status"])
    cells["error"] = cells["trial_id"].map(lambda t: trials[t]["error"])
    # λ=0 cells of k=1 and k=2 are one trial (no L_REG term); both rows show it, with a footnote.
    cells["shared"] = cells.groupby("trial_id")["trial_id"].transform("size") > 1
    for m in (*METRICS, LPIPS_METRIC):
        cells[m] = cells["trial_id"].map(lambda t, m=m: _as_float(trials[t]["metrics"].get(m)))
    cells = cells.drop(columns="config")

    if not (cells["status"] == "done").any():
        counts = cells.drop_duplicates("trial_id")["status"].value_counts()
        parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
        raise UserError(f"{_shown(root)}: no finished trials yet ({parts}); run `make sweep` first")
    frame = (pd.concat(per_image, ignore_index=True) if per_image
             else pd.DataFrame(columns=[*PER_IMAGE_COLUMNS, "trial_id"]))
    return SweepResults(root=root, name=str(plan.get("name") or root.name), cells=cells,
                        per_image=frame, trials=trials, record=record)


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
    if kind not in KINDS:
        raise UserError(f"{where}: cells[{i}] kind={kind!r}; expected one of {', '.join(KINDS)}")

    def field(key: str) -> Any:
        return cell[key] if key in cell else config.get(key)

    k, lambda_, seed = field("k"), field("lambda_"), field("seed")
    if kind == "cascade" and (k is None or lambda_ is None):
        raise UserError(f"{where}: cells[{i}] (cascade) needs k and lambda_")
    return {
        "cell": i,
        "trial_id": cell["trial_id"],
        "eval_id": str(cell.get("eval_id") or ""),
        "kind": kind,
        # Reference and control have no k/λ of their own: NaN, so they never land in a cascade row.
        "k": pd.NA if kind != "cascade" or k is None else int(k),
        "lambda_": np.nan if kind != "cascade" or lambda_ is None else float(lambda_),
        "seed": pd.NA if seed is None else int(seed),
        # Trials a search algorithm sampled (not grid cells); rows ordered after the grid's.
        "sampled": isinstance(cell.get("sampled"), dict),
        "config": config,
    }


def _trial_state(record: SweepRecord, trial_id: str, eval_id: str
                 ) -> tuple[str, str | None, dict[str, Any]]:
    """(status, first error line, metrics), the status in STATUSES terms (`REPORT_STATUS`);
    an unreadable metrics.json is a UserError naming it."""
    metrics = record.read_metrics(trial_id, eval_id)
    if metrics is not None:
        return "done", None, metrics
    status = record.status(trial_id, eval_id)
    shown = REPORT_STATUS[status.state]
    return shown, status.error if shown in ("failed", "stopped") else None, {}


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

    def known(key: str, of: list[dict[str, Any]]) -> str:  # "" where unrecorded (older results)
        return joined([f[key] for f in of if f[key] is not None])

    def ours(key: str) -> str:  # a cascade-only fact; "" for the reference row
        return known(key, cascade)

    return {
        "protocol": joined([f["protocol"] for f in facts]),
        "encoder": joined(encoders) if cascade else "",
        "encoder_pretrained": joined(pretrained) if cascade else "",
        "dataset": joined([f["data"] or "procedural benchmark" for f in cascade]) if cascade else "",
        "test_set": joined([f["test_data"] or "procedural test set" for f in facts]),
        "checkpoint": joined([f["checkpoint"] or "procedural base" for f in facts]),
        "demo": bool(reasons),
        "demo_reasons": "; ".join(reasons),
        "reduction": ours("reduction"),
        "encoder_features": ours("encoder_features"),
        "random_erasing": ours("random_erasing"),
        "random_erasing_on": ours("random_erasing_on"),
        "margin": ours("margin"),
        "base_kind": known("base_kind", facts),
        "eval_mode": known("eval_mode", facts),
        "eval_size": known("eval_size", facts),
        "data_loader": ours("data_loader"),
        "training": "; ".join(dict.fromkeys(training_text(f) for f in cascade)),
        "lpips": known("lpips", facts),
        "lpips_fingerprint": known("lpips_fingerprint", facts),
        "lpips_reason": known("lpips_reason", facts),
    }


LOADER_TEXT = {"flare7k": "Flare7K v1 loader", "flare7kpp": "Flare7K++ loader",
               "procedural": "procedural pairs"}


def training_text(facts: dict[str, Any]) -> str:
    """How one cascade trial was fine-tuned, as a caption says it: `SGD, lr 0.001, momentum 0,
    weight decay 0, constant schedule, 1000 steps x 8 crops of 128 px (Flare7K v1 loader)`;
    "?" where a fact is unrecorded (older results)."""
    def get(key: str) -> str:
        value = facts.get(key)
        return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    loader = LOADER_TEXT.get(str(facts.get("data_loader")), get("data_loader"))
    optimizer = get("optimizer")
    return (f"{optimizer.upper() if optimizer == 'sgd' else optimizer}, lr {get('lr')}, "
            f"momentum {get('momentum')}, weight decay {get('weight_decay')}, "
            f"{get('schedule')} schedule, {get('steps')} steps x {get('batch_size')} crops of "
            f"{get('crop')} px ({loader})")


def distance_summary(sweep: SweepResults, cells: pd.DataFrame) -> dict[str, float]:
    """The measured d(p, n) of a set of trials (metrics.json's `d_pn`): `d_pn_p50`, the mean over
    finished trials of each one's median, and `d_pn_hinge_active`, the mean fraction of samples
    whose triplet hinge was active. NaN where no trial recorded any (reference, lambda_ = 1)."""
    ids = dict.fromkeys(cells["trial_id"])
    stats = [sweep.trials[t]["d_pn"] for t in ids if sweep.trials[t]["status"] == "done"]
    stats = [s for s in stats if isinstance(s, dict) and s.get("count")]

    def mean(key: str) -> float:
        values = [_as_float(s.get(key)) for s in stats]
        return float(np.mean(values)) if values else float("nan")

    return {"d_pn_p50": mean("p50"), "d_pn_hinge_active": mean("hinge_active")}


def _pretrained_text(value: Any) -> str:
    return {True: "pretrained", False: "random weights"}.get(value, "weights unknown")


def demo_reasons(table: pd.DataFrame) -> str:
    """The distinct `demo_reasons` of a Table 1 frame's rows, in DEMO_REASONS order."""
    found = {r for text in table["demo_reasons"].dropna() for r in str(text).split("; ") if r}
    return "; ".join(r for r in (*DEMO_REASONS, *sorted(found - set(DEMO_REASONS))) if r in found)
