"""Tests for cascade.data.testset: pairing by stem, every bad-input case's UserError, and the
procedural test set of a trial (cache key, one build, given folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade.config import TrialConfig
from cascade.data import testset
from cascade.data.images import write_png
from cascade.data.testset import PairedTestSet
from cascade.errors import UserError


def _img(value: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _mask(h: int = 6, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w, 3), np.uint8)
    m[0, :] = (255, 255, 0)  # glare
    m[1, :] = (255, 0, 0)  # streak
    m[2, :] = (0, 0, 255)  # light
    m[3, :] = (128, 64, 0)  # antialiased glare/streak blend: accepted
    return m


def _make(root: Path, stems: list[str], prefixed: bool = False) -> Path:
    for k, stem in enumerate(stems):
        for folder, arr in (("input", _img(10 * k + 5)), ("gt", _img(10 * k)), ("mask", _mask())):
            name = f"{folder}_{stem}.png" if prefixed else f"{stem}.png"
            write_png(root / folder / name, arr)
    return root


def test_pairs_by_stem_not_sort_order(tmp_path: Path) -> None:
    root = _make(tmp_path, ["b", "a", "c"])
    # An unsorted, differently named gt file list must still pair by stem.
    ts = PairedTestSet(root)
    assert len(ts) == 3 and ts.stems == ["a", "b", "c"]
    item = ts[1]
    assert item.stem == "b"
    assert int(item.input[0, 0, 0]) == 5 and int(item.gt[0, 0, 0]) == 0  # b was made with k=0
    assert ts.path(1, "gt").name == "b.png"


def test_flare7k_style_prefixes_pair(tmp_path: Path) -> None:
    root = _make(tmp_path, ["000001", "000000"], prefixed=True)
    ts = PairedTestSet(root)
    assert ts.stems == ["000000", "000001"]
    assert ts.path(0, "gt").name == "gt_000000.png"  # the rule itself: tests/test_io.py


def test_same_stems_everywhere_pair_as_they_are(tmp_path: Path) -> None:
    # One rule with cascade.metrics: identical stems are the keys, prefix or not.
    for folder in ("input", "gt", "mask"):
        write_png(tmp_path / folder / "gt_a.png", _mask() if folder == "mask" else _img(3))
    assert PairedTestSet(tmp_path).stems == ["gt_a"]


def test_missing_root_and_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope: test set folder does not exist"):
        PairedTestSet(tmp_path / "nope")
    _make(tmp_path, ["a"])
    for p in (tmp_path / "mask").iterdir():
        p.unlink()
    (tmp_path / "mask").rmdir()
    with pytest.raises(UserError, match=r"mask: missing folder"):
        PairedTestSet(tmp_path)


def test_empty_folder(tmp_path: Path) -> None:
    _make(tmp_path, ["a"])
    (tmp_path / "gt" / "a.png").unlink()
    (tmp_path / "gt" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"gt: no images"):
        PairedTestSet(tmp_path)


def test_unmatched_stem_names_file(tmp_path: Path) -> None:
    _make(tmp_path, ["a", "b"])
    (tmp_path / "gt" / "b.png").rename(tmp_path / "gt" / "z.png")
    with pytest.raises(UserError, match=r"b.png: no matching file in .*gt"):
        PairedTestSet(tmp_path)


def test_duplicate_stem(tmp_path: Path) -> None:
    _make(tmp_path, ["a"])
    Image.fromarray(_img(1)).save(tmp_path / "input" / "a.jpg")
    with pytest.raises(UserError, match="same stem"):
        PairedTestSet(tmp_path)


def test_size_mismatch_names_file(tmp_path: Path) -> None:
    _make(tmp_path, ["a"])
    write_png(tmp_path / "gt" / "a.png", _img(0, h=7))
    with pytest.raises(UserError, match=r"gt/a.png: size 8x7 differs from .*input/a.png \(8x6\)"):
        PairedTestSet(tmp_path)


def test_truncated_image_names_file(tmp_path: Path) -> None:
    _make(tmp_path, ["a"])
    noisy = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    write_png(tmp_path / "input" / "a.png", noisy)
    data = (tmp_path / "input" / "a.png").read_bytes()
    (tmp_path / "input" / "a.png").write_bytes(data[:60])
    with pytest.raises(UserError, match=r"input/a.png: unreadable or truncated"):
        PairedTestSet(tmp_path)


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 255, 0), (255, 0, 255)])
def test_unexpected_mask_colour(tmp_path: Path, colour: tuple[int, int, int]) -> None:
    _make(tmp_path, ["a"])
    m = _mask()
    m[5, 7] = colour
    write_png(tmp_path / "mask" / "a.png", m)
    with pytest.raises(UserError, match=rf"mask/a.png: unexpected mask colour \({colour[0]}, "
                                        rf"{colour[1]}, {colour[2]}\) at \(x=7, y=5\)"):
        PairedTestSet(tmp_path)


def test_grayscale_converted_with_warning(tmp_path: Path) -> None:
    _make(tmp_path, ["a"])
    Image.fromarray(np.full((6, 8), 77, np.uint8), mode="L").save(tmp_path / "gt" / "a.png")
    with pytest.warns(UserWarning, match=r"gt/a.png.*grayscale"):
        ts = PairedTestSet(tmp_path)
    with pytest.warns(UserWarning):
        assert ts[0].gt.shape == (6, 8, 3) and int(ts[0].gt[3, 3, 1]) == 77


def cfg_for(tmp_path: Path, **changes) -> TrialConfig:
    return TrialConfig.from_dict({"base_cache": str(tmp_path), "embed_dim": 8, "depth": 1, "crop": 32,
                                  "batch_size": 2, "base_steps": 2, "n_test": 2, "test_size": 32,
                                  **changes})


def test_test_key_ignores_trial_fields_and_follows_test_fields(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for(tmp_path)
    assert testset.test_key(cfg) == testset.test_key(cfg.replace(seed=3, crop=64))
    assert testset.test_key(cfg) != testset.test_key(cfg.replace(n_test=3))
    import cascade.data.synthetic as synthetic

    # Pinned (generator /3, the "test" split): an accidental change of the key would silently
    # rebuild every cached test set; a deliberate one updates this value.
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/3")
    assert testset.test_key(TrialConfig()) == "746385b66289"


def test_the_procedural_test_set_is_the_test_split_and_shares_nothing_with_training(
        tmp_path: Path) -> None:
    import cascade.data.synthetic as synthetic
    from cascade.data.images import read_rgb

    cfg = cfg_for(tmp_path, n_test=3)
    root = testset.ensure_test_data(cfg)
    test = synthetic.ProceduralPairs(32, testset.TEST_SEED, split="test").render([0, 1, 2])
    # A trial whose seed equals TEST_SEED trains on the "train" split: other pixels.
    train = synthetic.ProceduralPairs(32, testset.TEST_SEED).batch([0, 1, 2])
    for i in range(3):
        written = read_rgb(root / "gt" / f"{i:06d}.png")
        assert np.array_equal(written, (test.gt[i] * 255).round().byte().permute(1, 2, 0).numpy())
        for j in range(3):
            assert not np.array_equal(written, (train[1][j] * 255).round().byte().permute(1, 2, 0).numpy())


def test_procedural_test_set_is_built_once_in_the_testset_layout(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for(tmp_path)
    root = testset.ensure_test_data(cfg)
    assert sorted(p.name for p in (root / "input").iterdir()) == ["000000.png", "000001.png"]
    assert {p.name for p in root.iterdir()} >= {"input", "gt", "mask"}
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    import cascade.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "generate_dataset", lambda *a, **k: pytest.fail("regenerated"))
    assert testset.ensure_test_data(cfg.replace(seed=9)) == root
    assert len(PairedTestSet(root)) == 2


def test_given_test_folders_are_used_as_is_or_refused_clearly(tmp_path: Path) -> None:
    assert testset.ensure_test_data(cfg_for(tmp_path, test_data=str(tmp_path))) == tmp_path.resolve()
    with pytest.raises(UserError, match="test_data/real"):
        testset.ensure_test_data(cfg_for(tmp_path, data=str(tmp_path), backgrounds=str(tmp_path)))


def test_a_new_data_generator_version_invalidates_the_test_set(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import cascade.data.synthetic as synthetic

    cfg = cfg_for(tmp_path)
    before = testset.test_key(cfg)
    monkeypatch.setattr(synthetic, "GENERATOR", "cascade.data.synthetic/999", raising=False)
    assert testset.test_key(cfg) != before
