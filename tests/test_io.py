"""Atomic writes: the target holds the old bytes or the new ones, and no temp file is left."""

import pytest

from cascade.io import atomic_path, atomic_write_json, atomic_write_text, read_json


def test_write_and_replace(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_json(target, {"psnr_entire": 23.74, "k": 2})
    assert read_json(target) == {"psnr_entire": 23.74, "k": 2}
    atomic_write_text(target, "{}")
    assert read_json(target) == {}
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "table1.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".csv") as tmp:
        assert tmp.name.endswith(".csv.tmp")
        tmp.write_text("half-writ")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table1.csv"]


def test_results_are_not_owner_only(tmp_path):
    from cascade import io

    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~io._UMASK


def test_image_files_one_rule_for_every_reader(tmp_path):
    from cascade.io import image_files

    for name in ("b.PNG", "a.webp", "c.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.webp", "b.PNG", "c.jpg"]
