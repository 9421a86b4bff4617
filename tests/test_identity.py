"""orchestrator.identity: training/evaluation identities from file contents, not paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cascade.config import TrialConfig
from cascade.errors import UserError
from orchestrator import identity
from orchestrator.space import cell_for


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLARESWEEP_CACHE", str(tmp_path / "cache"))
    identity._FILE_MEMO.clear()
    identity._TREE_MEMO.clear()


def _tree(root: Path) -> Path:
    for rel in ("Flare7K/Scattering_Flare/Compound_Flare/a.png", "Flare7K/Reflective_Flare/r.png",
                "Flare-R/Light_Source/l.png", "test_data/real/input/0.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 10)
    return root


def test_file_sha256_is_cached_and_sees_an_in_place_edit(tmp_path):
    f = tmp_path / "net.pth"
    f.write_bytes(b"weights")
    first = identity.file_sha256(f)
    assert first == identity.file_sha256(f, memo=False)  # from the cache file
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    f.write_bytes(b"weightz")  # same size, new content: mtime/inode key changes
    os.utime(f, ns=(1, 1))
    assert identity.file_sha256(f, memo=False) != first
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(f, moved)
    assert identity.file_sha256(moved) == identity.file_sha256(f, memo=False)
    with pytest.raises(UserError, match="nowhere.pth: cannot fingerprint it"):
        identity.file_sha256(tmp_path / "nowhere.pth")


def test_tree_fingerprint_covers_names_and_sizes_not_the_location(tmp_path):
    data = _tree(tmp_path / "a")
    fp = identity.tree_fingerprint(data, exclude=("test_data",), memo=False)
    copy = tmp_path / "b"
    shutil.copytree(data, copy)
    assert identity.tree_fingerprint(copy, exclude=("test_data",), memo=False) == fp
    (copy / "test_data" / "real" / "input" / "1.png").write_bytes(b"y")  # excluded: no change
    assert identity.tree_fingerprint(copy, exclude=("test_data",), memo=False) == fp
    (copy / "Flare-R" / "Light_Source" / "l.png").write_bytes(b"x" * 11)  # resized
    assert identity.tree_fingerprint(copy, exclude=("test_data",), memo=False) != fp
    assert fp.startswith("3:")  # three image files


def test_training_and_evaluation_identities(tmp_path):
    data, bg = _tree(tmp_path / "Flare7Kpp"), tmp_path / "bg"
    bg.mkdir()
    (bg / "b.jpg").write_bytes(b"b")
    ckpt = tmp_path / "net.pth"
    ckpt.write_bytes(b"weights")
    cfg = TrialConfig.from_dict({"data": str(data), "backgrounds": str(bg), "checkpoint": str(ckpt),
                                 "base_kind": "flare7kpp", "k": 2, "lambda_": 0.6})
    cell = cell_for(cfg)
    # Moved inputs: same identities. Another protocol: same training, new evaluation.
    moved = tmp_path / "nfs"
    shutil.copytree(tmp_path / "Flare7Kpp", moved / "Flare7Kpp")
    shutil.copytree(bg, moved / "bg")
    shutil.copy(ckpt, moved / "net.pth")
    there = cell_for(cfg.replace(data=str(moved / "Flare7Kpp"), backgrounds=str(moved / "bg"),
                                 checkpoint=str(moved / "net.pth")))
    assert (there.trial_id, there.eval_id) == (cell.trial_id, cell.eval_id)
    other = cell_for(cfg.replace(protocol="flare7k"))
    assert other.trial_id == cell.trial_id and other.eval_id != cell.eval_id
    assert other.eval_id.startswith("flare7k-")
    assert cell_for(cfg.replace(lr=2e-3)).trial_id != cell.trial_id
    # One byte of the checkpoint: a new trial.
    (moved / "net.pth").write_bytes(b"weightz")
    assert cell_for(cfg.replace(checkpoint=str(moved / "net.pth"))).trial_id != cell.trial_id
    # The procedural default is fingerprinted by its generator version and seeds.
    demo = cell_for(TrialConfig.from_dict({"k": 1, "lambda_": 1.0}))
    assert demo.fingerprints["training"]["procedural"]["generator"].startswith("cascade.data.synthetic/")


def test_no_training_field_is_also_an_evaluation_field():
    assert not set(identity.training_fields()) & set(identity.eval_fields())
    assert "protocol" in identity.eval_fields() and "lr" in identity.training_fields()
