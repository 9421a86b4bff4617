"""Image files <-> arrays <-> tensors, with clear errors and no silent mis-reads.

On disk and in numpy an image is `(H, W, 3)` uint8 RGB; in the network it is `(3, H, W)` float in
[0, 1]. `read_rgb` accepts what people actually hand us (grayscale, RGBA, 16-bit PNGs, palette
images) but converts anything that is not plain 8-bit RGB with a `warnings.warn` naming the file,
and turns unreadable or truncated files into a `UserError` naming the file.

Pixels are returned as stored: EXIF orientation is *not* applied, because input, gt and mask of a
pair must stay aligned pixel for pixel whatever metadata one of them carries.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cascade.errors import UserError
from cascade.io import atomic_path

# PNG colour types (IHDR byte 25) and the byte holding the bit depth (IHDR byte 24).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bit_depth(path: Path) -> int | None:
    """Bit depth per channel from a PNG header, or None if `path` is not a PNG.

    Pillow opens 16-bit RGB(A) PNGs as 8-bit "RGB"/"RGBA" without saying so; the header tells.
    """
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE):
        return None
    return head[24]


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB.

    Grayscale is replicated to three channels, alpha is dropped, 16-bit values are rescaled to
    8 bits (v / 257, rounded) and CMYK/YCbCr are converted, each with a warning naming the file.
    Palette images whose palette has no transparency are converted exactly and silently.

    Args:
        path: an image file Pillow can decode (PNG, JPEG, BMP, TIFF, ...).
    Returns:
        (H, W, 3) uint8 array in [0, 255], C-contiguous.
    Raises:
        UserError: missing, unreadable, truncated or unsupported (e.g. float) images.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncation errors surface here, not later
            mode = img.mode
            has_transparency = "transparency" in img.info
            array = _to_rgb(img, path, mode, has_transparency)
    except UserError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: unreadable or truncated image ({exc})") from None
    if _png_bit_depth(path) == 16 and mode in ("RGB", "RGBA"):
        # Pillow already dropped the low bytes of a 16-bit colour PNG; say so.
        warnings.warn(f"{path}: 16-bit PNG read as 8 bits per channel", stacklevel=2)
    # np.asarray on a PIL image is read-only; callers (torch.from_numpy) need a writable array.
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _to_rgb(img: Image.Image, path: Path, mode: str, has_transparency: bool) -> np.ndarray:
    """Convert an opened Pillow image of any supported mode to (H, W, 3) uint8."""
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode == "P" and not has_transparency:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)  # exact: the palette is RGB
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise UserError(f"{path}: {mode} image with values outside 0..65535 is not supported")
        warnings.warn(f"{path}: 16-bit grayscale image converted to 8-bit RGB", stacklevel=3)
        # v / 257 maps 0..65535 onto 0..255 exactly at both ends (65535 = 255 * 257).
        gray = np.floor(values / 257.0 + 0.5).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("L", "1", "LA", "La"):
        warnings.warn(f"{path}: grayscale image ({mode}) converted to RGB", stacklevel=3)
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "RGBa", "RGBX", "PA", "P"):
        warnings.warn(f"{path}: {mode} image: alpha/transparency dropped", stacklevel=3)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        warnings.warn(f"{path}: {mode} image converted to RGB", stacklevel=3)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    raise UserError(f"{path}: unsupported image mode {mode!r}; expected an 8- or 16-bit RGB/gray image")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB array as a PNG, atomically (cascade.io.atomic_path).

    The bytes depend only on the pixels, so equal arrays give byte-identical files.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_png expects (H, W, 3) uint8, got {image.dtype} {image.shape}")
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(tmp, format="PNG")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8 numpy array.

    Rounds as floor(x * 255 + 0.5) (halves go up, never to even) after clamping to [0, 1], so
    `to_uint8(to_tensor(a)) == a` for every uint8 image `a`. Non-finite values are a bug upstream
    and raise ValueError rather than becoming arbitrary bytes.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"to_uint8 expects a (3, H, W) tensor, got shape {tuple(image.shape)}")
    x = image.detach().to("cpu", torch.float64)  # float64: k/255 * 255 must land on k exactly
    if not torch.isfinite(x).all():
        raise ValueError("to_uint8: image contains NaN or infinite values")
    x = torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy().astype(np.uint8))


def to_tensor(
    image: np.ndarray,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(H, W, 3) uint8 numpy array -> (3, H, W) tensor in [0, 1] on `device`."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"to_tensor expects (H, W, 3) uint8, got {image.dtype} {image.shape}")
    t = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    return t.permute(2, 0, 1).to(dtype) / 255.0
