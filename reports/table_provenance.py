"""Which code and inputs produced each cell of a table, and a warning when they differ.

Every finished evaluation's metrics.json carries `provenance` (orchestrator.provenance): the
flaresweep commit (with `+dirty`), package versions and whether they match requirements.lock, the
device, and the content fingerprints of its inputs. Identities never include the code version, so a
table can mix cells computed by different code; this module makes that visible: per-row columns
in table1.csv, a sentence in the caption, and a warning from `make table1`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import pandas as pd

from reports.collect import SweepResults

COLUMNS = ("code_version", "inputs", "lock", "provenance_differs")


def _trial(sweep: SweepResults, trial_id: str) -> dict[str, Any]:
    """(code version, inputs digest, lock text) of one finished trial; "unknown" where missing."""
    prov = (sweep.trials.get(trial_id, {}).get("metrics") or {}).get("provenance") or {}
    prints = prov.get("fingerprints")
    inputs = _short(prints) if prints else "unknown"
    lock = prov.get("lock") or {}
    if lock.get("matches") is True:
        lock_text = "matches " + str(lock.get("file"))
    elif lock.get("matches") is False:
        lock_text = "differs: " + ", ".join(f"{k} {v[0]} (locked {v[1]})"
                                             for k, v in sorted(lock.get("differs", {}).items()))
    else:
        lock_text = "unknown"
    return {"code_version": str(prov.get("code") or "unknown"), "inputs": inputs, "lock": lock_text}


def _short(fingerprints: Any) -> str:
    """12 hex digits of a fingerprint dict (the same inputs give the same digits)."""
    blob = json.dumps(fingerprints, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def provenance_columns(sweep: SweepResults, table: pd.DataFrame) -> pd.DataFrame:
    """COLUMNS for each row of a Table 1 frame (aligned to its index).

    `provenance_differs` is True for rows with a finished trial whose code version or training
    inputs differ from the most common ones among the table's finished trials.
    """
    done = [t for t, f in sweep.trials.items() if f.get("status") == "done"]
    facts = {t: _trial(sweep, t) for t in done}
    common_code = Counter(f["code_version"] for f in facts.values()).most_common(1)
    common_inputs = Counter(f["inputs"] for f in facts.values()).most_common(1)
    rows = []
    for ids in table["trial_ids"].fillna(""):
        mine = [facts[t] for t in str(ids).split(";") if t in facts]
        rows.append({
            "code_version": "; ".join(dict.fromkeys(f["code_version"] for f in mine)) or None,
            "inputs": "; ".join(dict.fromkeys(f["inputs"] for f in mine)) or None,
            "lock": "; ".join(dict.fromkeys(f["lock"] for f in mine)) or None,
            "provenance_differs": bool(mine) and any(
                f["code_version"] != common_code[0][0] or f["inputs"] != common_inputs[0][0]
                for f in mine)})
    return pd.DataFrame(rows, index=table.index, columns=list(COLUMNS))


def warnings(columns: pd.DataFrame) -> list[str]:
    """One line per way the table's cells differ in what produced them (empty when they agree)."""
    lines = []
    codes = {c for text in columns["code_version"].dropna() for c in str(text).split("; ")}
    if len(codes) > 1:
        lines.append(f"cells come from {len(codes)} code versions ({', '.join(sorted(codes))}); "
                     "table1.csv marks them in provenance_differs")
    inputs = {c for text in columns["inputs"].dropna() for c in str(text).split("; ")}
    if len(inputs) > 1:
        lines.append(f"cells were computed from {len(inputs)} different input fingerprints; "
                     "table1.csv marks them in provenance_differs")
    locks = [t for t in columns["lock"].dropna() if "differs" in str(t)]
    if locks:
        lines.append(f"package versions differ from requirements.lock: {locks[0]}")
    return lines


def caption(columns: pd.DataFrame) -> str:
    """The caption's sentence on the code version (LaTeX-safe: commit hashes only)."""
    codes = sorted({c for text in columns["code_version"].dropna() for c in str(text).split("; ")})
    if not codes:
        return ""
    text = f"Code: flaresweep {codes[0]}" if len(codes) == 1 else (
        f"Code: {len(codes)} flaresweep versions ({', '.join(codes)}), see table1.csv")
    return text + "."
