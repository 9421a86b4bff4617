"""Tests for `python -m cascade.infer`: outputs equal the model's, metadata, help and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.data.images import read_rgb, to_tensor, to_uint8, write_png
from cascade.infer import build_parser, main
from cascade.model import CascadedFlareRemover, flare7k_large, official_output
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



# -- --mode and --base-kind -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def light_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one 24x24 photo: dark noise and a saturated 10x10 light."""
    folder = tmp_path_factory.mktemp("light") / "in"
    array = np.random.default_rng(2).integers(0, 100, (24, 24, 3), dtype=np.uint8)
    array[6:16, 8:18] = 255
    write_png(folder / "light.png", array)
    return folder


def test_help_documents_mode_and_base_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--mode {native,flare7k-large}" in text and "(default: native)" in text
    assert "--base-kind {flare7k,flare7kpp}" in text and "test_large.py: 0.95" in text


def test_base_kind_native_is_test_py(tmp_path: Path, setup: tuple[Path, Path, Uformer],
                                     light_photo: Path) -> None:
    checkpoint, _, model = setup
    x = to_tensor(read_rgb(light_photo / "light.png"))[None]
    outputs = {}
    for kind in ("flare7k", "flare7kpp"):
        out = tmp_path / kind
        main(["--checkpoint", str(checkpoint), "--input", str(light_photo), "--output", str(out),
              "--base-kind", kind])
        outputs[kind] = read_rgb(out / "light.png")
        assert np.array_equal(outputs[kind], to_uint8(official_output(model, x, kind)[0]))
        meta = json.loads((out / "metadata.json").read_text())
        assert meta["mode"] == "native" and meta["base_kind"] == kind and meta["tile"] == 512
        assert meta["light_source_blend"] == ("flare7k_test_py" if kind == "flare7k" else "none")
        assert meta["light_threshold"] == (0.97 if kind == "flare7k" else None)
    # flare7kpp: the network's channels 0:3; flare7k: the light taken back from the input.
    assert np.array_equal(outputs["flare7kpp"], expected_png(model, light_photo / "light.png"))
    assert (outputs["flare7k"][11, 13] == 255).all() and not (outputs["flare7kpp"][11, 13] == 255).all()


def test_flare7k_large_mode(tmp_path: Path, setup: tuple[Path, Path, Uformer],
                            light_photo: Path) -> None:
    checkpoint, _, model = setup
    out = tmp_path / "out"
    main(["--checkpoint", str(checkpoint), "--input", str(light_photo), "--output", str(out),
          "--mode", "flare7k-large", "--base-kind", "flare7k"])
    x = to_tensor(read_rgb(light_photo / "light.png"))[None]
    got = read_rgb(out / "light.png")
    assert got.shape == (24, 24, 3)
    assert np.array_equal(got, to_uint8(flare7k_large(model, x, light_threshold=0.95)[0]))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["mode"] == "flare7k-large" and meta["base_kind"] == "flare7k"
    assert meta["tile"] is None and meta["overlap"] is None
    assert meta["light_source_blend"] == "flare7k_test_large_py" and meta["light_threshold"] == 0.95


def test_mode_and_blend_errors(tmp_path: Path, setup: tuple[Path, Path, Uformer],
                               capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, inputs, _ = setup
    base = ["--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(tmp_path / "o")]
    cases = [
        (["--mode", "flare7k-large", "--tile", "256"], "--mode flare7k-large uses test_large.py"),
        (["--base-kind", "flare7k", "--blend-light-source"], "drop --blend-light-source"),
        (["--light-threshold", "0.9"], "--light-threshold only makes sense with --blend-light"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main([*base, *argv])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:  # argparse's own choice check
        main([*base, "--base-kind", "flare7k_v1"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
