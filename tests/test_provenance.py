"""orchestrator.provenance (what produced a result) and reports.table_provenance (tables say so)."""

from __future__ import annotations

import json

import pandas as pd
from test_collect import make_results_tree, result_dir

from orchestrator import provenance as prov
from reports.table1 import build_reports


def test_collect_records_code_packages_lock_and_inputs():
    record = prov.collect({"training": {"checkpoint": "abc"}}, "cpu")
    assert record["code"] == prov.code_version() and record["code"] != ""
    assert set(record["packages"]) == set(prov.PACKAGES) and record["packages"]["torch"]
    assert record["fingerprints"] == {"training": {"checkpoint": "abc"}}
    assert record["lock"]["matches"] is True  # this environment was installed from the lock


def test_lock_comparison_ignores_local_versions(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# pinned\ntorch==2.9.1\nray[tune]==2.60.0\n")
    assert prov.read_lock(lock) == {"torch": "2.9.1", "ray": "2.60.0"}
    assert prov.lock_mismatches({"torch": "2.9.1+cu128", "ray": "2.60.0"}, lock)["matches"]
    assert prov.lock_mismatches({"torch": "2.8.0", "ray": "2.60.0"}, lock)["differs"] == {
        "torch": ["2.8.0", "2.9.1"]}


def test_table1_warns_and_marks_cells_from_other_code(tmp_path, capsys):
    sweep = make_results_tree(tmp_path, with_images=False)
    for tid in ("ref-s0", "k1-l1.0-s0", "k2-l1.0-s0", "l0-s0", "k2-l0.6-s0"):
        path = result_dir(sweep, tid) / "metrics.json"
        metrics = json.loads(path.read_text())
        code = "def456+dirty" if tid == "k2-l1.0-s0" else "abc123"
        metrics["provenance"] = {"code": code, "fingerprints": {"training": {"checkpoint": "x"}},
                                 "lock": {"file": "requirements.lock", "matches": True, "differs": {}}}
        path.write_text(json.dumps(metrics))
    build_reports(sweep, paper=False)
    err = capsys.readouterr().err
    assert "warning: demo: cells come from 2 code versions (abc123, def456+dirty)" in err
    table = pd.read_csv(sweep / "table1.csv")
    marked = table[table["provenance_differs"]]
    assert list(zip(marked["k"], marked["lambda_"])) == [(2, 1.0)]
    assert set(table["code_version"].dropna()) == {"abc123", "def456+dirty"}
    assert "Code: 2 flaresweep versions (abc123, def456+dirty)" in (sweep / "table1.tex").read_text()
