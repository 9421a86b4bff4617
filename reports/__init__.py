"""reports: a sweep's results tree -> Table 1 (CSV, LaTeX), differences with CIs, figures.

Pure pandas / numpy / matplotlib; no Ray, no torch. `build_reports(sweep_dir, paper=True)` writes
everything into the sweep folder and returns the files written (`python -m reports.table1`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_reports"]


def __getattr__(name: str) -> Any:
    # Imported lazily so `python -m reports.table1` does not load reports.table1 twice.
    if name == "build_reports":
        from reports.table1 import build_reports

        return build_reports
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
