"""reports: a sweep's results tree -> Table 1 (CSV, LaTeX), differences with CIs, figures.

Pure pandas / numpy / matplotlib; no Ray, no torch. `reports.table1.build_reports(sweep_dir)`
writes everything and returns the files written (`python -m reports.table1`; `sweep.py table1`
calls it). This package file imports nothing, so importing any of its modules never runs another.
"""
