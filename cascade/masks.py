"""Flare7K mask convention: which pixels are streak, glare, light source.

Mask images are RGB uint8. Flare7K paints glare (255, 255, 0), streak (255, 0, 0), light source
(0, 0, 255) and everything else (0, 0, 0). Its evaluation turns a mask into soft weights in [0, 1]:
streak = (R - G) / 255, glare = G / 255, light source = B / 255, global = 1 - B / 255 (all but the
light source). Antialiased or resized masks therefore give fractional weights at region borders.
"""

from __future__ import annotations

import numpy as np

MASK_COLOURS: dict[str, tuple[int, int, int]] = {
    "glare": (255, 255, 0),
    "streak": (255, 0, 0),
    "light": (0, 0, 255),
    "other": (0, 0, 0),
}

REGIONS = ("streak", "glare", "light", "global")


def region_weights(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Soft region weights from an RGB mask.

    Args:
        mask: (H, W, 3) uint8 in [0, 255], Flare7K colours.
    Returns:
        {"streak", "glare", "light", "global"} -> (H, W) float64 weights in [0, 1].
    """
    if mask.ndim != 3 or mask.shape[2] != 3:
        raise ValueError(f"mask must be (H, W, 3), got shape {mask.shape}")
    m = mask.astype(np.float64)
    r, g, b = m[..., 0], m[..., 1], m[..., 2]
    return {
        # R - G is negative nowhere in a valid mask; clip guards against odd antialiasing.
        "streak": np.clip(r - g, 0.0, 255.0) / 255.0,
        "glare": g / 255.0,
        "light": b / 255.0,
        "global": 1.0 - b / 255.0,
    }


def paint_mask(streak: np.ndarray, glare: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Paint boolean region maps into a Flare7K RGB mask (light over streak over glare).

    Args:
        streak, glare, light: (H, W) bool.
    Returns:
        (H, W, 3) uint8 mask in Flare7K colours.
    """
    mask = np.zeros((*streak.shape, 3), dtype=np.uint8)
    mask[glare] = MASK_COLOURS["glare"]
    mask[streak] = MASK_COLOURS["streak"]
    mask[light] = MASK_COLOURS["light"]
    return mask
