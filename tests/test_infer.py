"""Tests for `python -m cascade.infer`: outputs equal the model's, metadata, help and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.data.images import read_rgb, to_tensor, to_uint8, write_png
from cascade.infer import build_parser, main
from cascade.model import CascadedFlareRemover
from cascade.uformer import Uformer, save_checkpoint

TINY = dict(img_size=64, embed_dim=8, depths=(1,) * 9, win_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Uformer]:
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    model = Uformer(**TINY).eval()
    save_checkpoint(model, root / "tiny.pth")
    rng = np.random.default_rng(0)
    inputs = root / "in"
    write_png(inputs / "b_photo.png", rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    write_png(inputs / "a_photo.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (inputs / "notes.txt").write_text("not an image")
    return root / "tiny.pth", inputs, model


def expected_png(net: torch.nn.Module, path: Path) -> np.ndarray:
    with torch.no_grad():
        out = net(to_tensor(read_rgb(path))[None])
    out = out[1] if isinstance(out, tuple) else out
    return to_uint8(out[0, :3])


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--input", "--output", "--cascade", "--negative", "--tile",
                   "--overlap",
                   "--blend-light-source", "--light-threshold", "--device"):
        assert option in text


def test_writes_the_models_output_and_metadata(tmp_path: Path,
                                               setup: tuple[Path, Path, Uformer]) -> None:
    checkpoint, inputs, model = setup
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_photo.png", "b_photo.png", "metadata.json"]
    for name in ("a_photo.png", "b_photo.png"):
        got = read_rgb(out / name)
        assert got.shape == read_rgb(inputs / name).shape
        assert np.array_equal(got, expected_png(model, inputs / name))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["cascade"] is False and meta["light_source_blend"] == "none"
    assert meta["tile"] == 512 and meta["overlap"] == 128 and meta["device"] == "cpu"
    assert meta["arch"] == model.arch
    assert [m["input"] for m in meta["images"]] == ["a_photo.png", "b_photo.png"]


def test_cascade_and_blend_are_recorded(tmp_path: Path, setup: tuple[Path, Path, Uformer]) -> None:
    checkpoint, inputs, model = setup
    out = tmp_path / "out"
    main(["--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out),
          "--cascade", "--blend-light-source", "--tile", "48", "--device", "cpu"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["cascade"] is True and meta["light_source_blend"] == "flare7k_test_py"
    assert meta["negative_checkpoint"] == str(checkpoint)
    assert meta["light_threshold"] == 0.97 and meta["tile"] == 48 and meta["overlap"] == 12
    # Random-noise inputs have no saturated light source, so the blend leaves pixels unchanged;
    # its 56 px width takes two 48 px tiles, which differ from one pass only slightly.
    cascade = CascadedFlareRemover.from_uformer(model).eval()
    got = read_rgb(out / "b_photo.png").astype(int)
    assert np.abs(got - expected_png(cascade, inputs / "b_photo.png")).max() <= 8


def test_cascade_with_a_separate_negative(tmp_path: Path, setup: tuple[Path, Path, Uformer]) -> None:
    checkpoint, _, anchor = setup
    torch.manual_seed(1)
    negative = Uformer(**TINY).eval()
    save_checkpoint(negative, tmp_path / "negative.pth")
    inputs = tmp_path / "in"
    write_png(inputs / "x.png", np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    main(["--checkpoint", str(checkpoint), "--negative", str(tmp_path / "negative.pth"),
          "--cascade", "--input", str(inputs), "--output", str(tmp_path / "out")])
    expected = expected_png(CascadedFlareRemover(negative, anchor).eval(), inputs / "x.png")
    assert np.array_equal(read_rgb(tmp_path / "out" / "x.png"), expected)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["negative_checkpoint"] == str(tmp_path / "negative.pth")


def test_user_errors_exit_2_with_one_line(tmp_path: Path, setup: tuple[Path, Path, Uformer],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, inputs, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--checkpoint", str(checkpoint), "--input", str(empty)], "no images"),
        (["--checkpoint", str(tmp_path / "none.pth"), "--input", str(inputs)], "none.pth: no such"),
        (["--checkpoint", str(checkpoint), "--input", str(inputs), "--tile", "16",
          "--overlap", "16"], "0 <= overlap < tile"),
        (["--checkpoint", str(checkpoint), "--input", str(inputs), "--device", "gpu7"],
         "not a torch device"),
        (["--checkpoint", str(checkpoint), "--input", str(inputs), "--negative", str(checkpoint)],
         "--negative only makes sense with --cascade"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main([*argv, "--output", str(tmp_path / "out")])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
