"""Tests for cascade.data.images: reading conversions, errors naming the file, round-trips."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade.data.images import read_rgb, to_tensor, to_uint8, write_png
from cascade.errors import UserError


def _png_bytes(array: np.ndarray, colour_type: int) -> bytes:
    """A minimal 16-bit PNG encoder (Pillow cannot write 16-bit RGB)."""
    h, w = array.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = array.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_png_round_trip_is_exact(tmp_path: Path, rgb: np.ndarray) -> None:
    write_png(tmp_path / "a.png", rgb)
    out = read_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_write_png_is_deterministic(tmp_path: Path, rgb: np.ndarray) -> None:
    write_png(tmp_path / "a.png", rgb)
    write_png(tmp_path / "b.png", rgb.copy())
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_write_png_rejects_wrong_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))


def test_grayscale_is_replicated_with_warning(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    with pytest.warns(UserWarning, match="g.png.*grayscale"):
        out = read_rgb(tmp_path / "g.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_drops_alpha_with_warning(tmp_path: Path, rgb: np.ndarray) -> None:
    alpha = np.full((5, 7, 1), 7, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="a.png.*alpha"):
        out = read_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out, rgb)  # colour untouched, not premultiplied


def test_16bit_gray_is_rescaled_with_warning(tmp_path: Path) -> None:
    values = np.array([[0, 257, 65535, 128 * 257 + 128]], dtype=np.uint16)
    (tmp_path / "d.png").write_bytes(_png_bytes(values, colour_type=0))
    with pytest.warns(UserWarning, match="d.png.*16-bit"):
        out = read_rgb(tmp_path / "d.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_rgb_warns(tmp_path: Path) -> None:
    values = np.full((2, 3, 3), 200 * 257, dtype=np.uint16)
    (tmp_path / "c16.png").write_bytes(_png_bytes(values, colour_type=2))
    with pytest.warns(UserWarning, match="c16.png.*16-bit"):
        out = read_rgb(tmp_path / "c16.png")
    np.testing.assert_array_equal(out, np.full((2, 3, 3), 200, np.uint8))


def test_palette_without_transparency_is_silent_and_exact(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), expected)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.png: no such image file"):
        read_rgb(tmp_path / "nope.png")


def test_garbage_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(UserError, match="junk.png: unreadable"):
        read_rgb(tmp_path / "junk.png")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file_names_it(tmp_path: Path, suffix: str) -> None:
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / f"full.{suffix}"
    Image.fromarray(noisy).save(full)
    data = full.read_bytes()
    (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"cut.{suffix}: unreadable or truncated"):
        read_rgb(tmp_path / f"cut.{suffix}")


def test_to_uint8_rounds_half_up_and_clamps() -> None:
    x = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, -0.2, 1.7, 0.49999 / 255]).double()
    img = x.view(1, 1, 6).expand(3, 1, 6)
    out = to_uint8(img)
    assert out.shape == (1, 6, 3) and out.dtype == np.uint8
    # floor(x*255 + 0.5): 0.5 -> 1, 1.5 -> 2, 2.5 -> 3 (no round-half-to-even), clamps at 0/255.
    np.testing.assert_array_equal(out[0, :, 0], [1, 2, 3, 0, 255, 0])


def test_uint8_tensor_round_trip_all_values() -> None:
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    t = to_tensor(a)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0
    np.testing.assert_array_equal(to_uint8(t), a)


def test_to_uint8_rejects_nan_and_bad_shape() -> None:
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_uint8(torch.zeros(1, 3, 2, 2))


def test_read_rgb_returns_a_writable_array(tmp_path):
    from cascade.data.images import read_rgb, write_png

    write_png(tmp_path / "a.png", np.zeros((4, 5, 3), dtype=np.uint8))
    assert read_rgb(tmp_path / "a.png").flags.writeable
