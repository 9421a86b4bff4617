"""cascade.io: atomic writes (old bytes or new, no temp file left), the cache folder, file locks,
digests, strict YAML, and the one listing and pairing of image folders."""

import hashlib
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from cascade.errors import UserError
from cascade.io import (
    FLOAT_LITERAL,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    digest,
    list_images,
    pair_images,
    pair_key,
    parse_yaml,
    read_json,
)
from cascade.locks import file_lock


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
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~io.UMASK


def test_image_files_one_rule_for_every_reader(tmp_path):
    from cascade.io import image_files

    for name in ("b.PNG", "a.webp", "c.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.webp", "b.PNG", "c.jpg"]


# -- cache folder, locks, digests ------------------------------------------------------------------


def test_cache_dir_is_absolute_and_configurable(tmp_path, monkeypatch):
    monkeypatch.delenv("FLARESWEEP_CACHE", raising=False)
    assert cache_dir().is_absolute() and cache_dir(None) == cache_dir("")
    monkeypatch.setenv("FLARESWEEP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir(str(tmp_path)) == tmp_path.resolve()  # a trial's base_cache wins


def test_file_lock_is_exclusive(tmp_path):
    order = []
    lock = tmp_path / "x.lock"

    def holder():
        with file_lock(lock):
            order.append("a in")
            time.sleep(0.3)
            order.append("a out")

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.1)
    with file_lock(lock):  # a second open file description: blocks until released
        order.append("b in")
    t.join()
    assert order == ["a in", "a out", "b in"]


def _hold_in_another_process(lock: Path, shared: bool) -> subprocess.Popen:
    """A python process holding `lock` until its stdin closes; returns once it holds it."""
    code = textwrap.dedent(f"""
        import sys
        from cascade.locks import file_lock
        with file_lock({str(lock)!r}, shared={shared}):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_file_lock_non_blocking_raises_while_another_process_holds_it(tmp_path):
    lock = tmp_path / "deep" / "sweep" / ".lock"  # parent folders are created
    proc = _hold_in_another_process(lock, shared=False)
    try:
        with pytest.raises(BlockingIOError), file_lock(lock, blocking=False):
            pass
        with pytest.raises(BlockingIOError), file_lock(lock, shared=True, blocking=False):
            pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    with file_lock(lock, blocking=False):  # released when the holder exited
        pass


def test_shared_locks_coexist_and_exclude_an_exclusive_one(tmp_path):
    lock = tmp_path / "x.lock"
    proc = _hold_in_another_process(lock, shared=True)
    try:
        with file_lock(lock, shared=True, blocking=False):  # a reader beside a reader
            pass
        with pytest.raises(BlockingIOError), file_lock(lock, blocking=False):
            pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_digest_is_the_sha256_of_compact_sorted_json():
    # Known values, computed before the move (cascade.base._digest / TrialConfig.digest): trial
    # ids and cache folders on disk depend on them.
    assert digest({"a": 1, "b": [1, 2], "c": None}) == "7dc62ed95f47"
    assert digest({"c": None, "b": [1, 2], "a": 1}) == "7dc62ed95f47"  # key order does not matter
    assert digest({"k": 2, "lambda_": 0.6}) == "57d4cb71c6f9"
    blob = b'{"a":1,"b":[1,2],"c":null}'  # compact separators, sorted keys
    assert digest({"c": None, "a": 1, "b": [1, 2]}, n=20) == hashlib.sha256(blob).hexdigest()[:20]
    assert len(digest([], n=64)) == 64


# -- strict YAML ------------------------------------------------------------------------------------


def test_parse_yaml_reads_exponent_floats_as_floats():
    values = parse_yaml("lr: 1e-3\nbase_lr: 2E-4\nmargin: .5\nsteps: 3\nx: 1.5e3\nname: run1\n"
                        "inf: .inf\nflag: true\nnothing: null\nquoted: '1e-3'")
    assert values == {"lr": 1e-3, "base_lr": 2e-4, "margin": 0.5, "steps": 3, "x": 1500.0,
                      "name": "run1", "inf": float("inf"), "flag": True, "nothing": None,
                      "quoted": "1e-3"}
    assert type(values["steps"]) is int and type(values["lr"]) is float
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # the YAML 1.1 quirk this guards against
    assert parse_yaml('{"a": [1, 2.5]}') == {"a": [1, 2.5]}  # JSON is YAML
    assert parse_yaml("") is None


def test_parse_yaml_rejects_duplicate_keys_at_any_depth():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'lr'"):
        parse_yaml("lr: 1\nlr: 2\n")
    with pytest.raises(yaml.YAMLError, match="duplicate key 'k'"):
        parse_yaml("grid:\n  k: [1]\n  k: [2]\n")


@pytest.mark.parametrize("text", ["1e-3", "-2E+4", ".5", "3", "1.", "+0.25e1"])
def test_float_literal_accepts_decimal_numbers(text):
    assert FLOAT_LITERAL.match(text)


@pytest.mark.parametrize("text", ["", "e3", "1e", "0x10", "nan", "1,5", "1e-3 ", "inf"])
def test_float_literal_rejects_what_is_not_one(text):
    assert not FLOAT_LITERAL.match(text)


# -- image folders ----------------------------------------------------------------------------------


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_list_images_refuses_what_no_reader_can_use(tmp_path):
    assert [p.name for p in list_images(_touch(tmp_path / "ok", "b.png", "a.jpg"))] == ["a.jpg", "b.png"]
    with pytest.raises(UserError, match=r"^\S*nowhere: no such input folder$"):
        list_images(tmp_path / "nowhere", "input folder")
    with pytest.raises(UserError, match=r"empty: no images \(.png, .jpg.*\) in this folder$"):
        list_images(_touch(tmp_path / "empty", "notes.txt"))
    with pytest.raises(UserError, match=r"two: a.jpg and a.png have the same stem 'a'"):
        list_images(_touch(tmp_path / "two", "a.png", "a.jpg"))


def test_pair_key_drops_only_the_prefix_of_the_folder_role():
    assert pair_key("input/input_000001.png", "input") == "000001"
    assert pair_key("gt/input_000001.png", "gt") == "input_000001"
    assert pair_key("gt/gt_000001.png", "gt") == "000001"
    assert pair_key("x/deflare_7.png", "pred") == "7" and pair_key("x/gt_7.png", "pred") == "7"
    assert pair_key("gt/gt_.png", "gt") == "gt_"  # nothing left after the prefix: kept whole
    assert pair_key("masks/masks_3.png", "masks") == "3"  # another role drops its own name


def test_pair_images_one_rule_for_test_sets_and_prediction_folders(tmp_path):
    same = {role: list_images(_touch(tmp_path / "same" / role, "gt_0.png", "gt_1.png"))
            for role in ("pred", "gt", "mask")}
    keyed = pair_images(same)  # identical stems everywhere: they are the keys, prefix or not
    assert {role: sorted(files) for role, files in keyed.items()} == {
        "pred": ["gt_0", "gt_1"], "gt": ["gt_0", "gt_1"], "mask": ["gt_0", "gt_1"]}
    flare7k = {"pred": list_images(_touch(tmp_path / "f" / "pred", "000000.png")),
               "gt": list_images(_touch(tmp_path / "f" / "gt", "gt_000000.png")),
               "mask": list_images(_touch(tmp_path / "f" / "mask", "mask_000000.png"))}
    keyed = pair_images(flare7k)  # gt_000000 pairs with 000000
    assert {role: list(files) for role, files in keyed.items()} == {
        "pred": ["000000"], "gt": ["000000"], "mask": ["000000"]}
    assert keyed["gt"]["000000"].name == "gt_000000.png"
    clash = {"gt": list_images(_touch(tmp_path / "c" / "gt", "gt_1.png", "1.png")),
             "mask": list_images(_touch(tmp_path / "c" / "mask", "1.png"))}
    with pytest.raises(UserError, match=r"gt: 1.png and gt_1.png pair as '1'"):
        pair_images(clash)
