"""The frozen perceptual encoder f's wrapper, shared by every encoder (cascade.encoders) and the
demo's own (cascade.demo_encoder): resizing, normalisation, frozen eval mode.

Its own module so that both builders import it from below, and neither imports the other's
module back (cascade.encoders lists the demo encoder among its ENCODERS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cascade.errors import UserError

_INTERPOLATIONS = ("bilinear", "bicubic")
ENCODER_FEATURES = ("cls", "tokens")
"""What an encoder returns: the pooled embedding or the unpooled tokens (module docstring)."""


class PerceptualEncoder(nn.Module):
    """A frozen feature extractor: `(B, 3, H, W)` in [0, 1] -> `(B, embed_dim)` float32.

    Always in eval mode (`.train()` is a no-op, so a parent module's `.train()` cannot switch on
    BatchNorm updates or dropout) and every parameter has `requires_grad=False`; gradients still
    flow to the *input*. Attributes: `name` (as requested), `embed_dim`, `image_size` (side of the
    square the input is resized to), `pretrained` (bool), `weights_source` ("torchvision:<enum>",
    "timm:<model>.<tag>", a local file's absolute path, or "random"), `features` ("cls" or
    "tokens", see ENCODER_FEATURES; with "tokens", `embed_dim` is N*D).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        name: str,
        embed_dim: int,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        interpolation: str,
        weights_source: str,
        features: str = "cls",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.features = features
        self.embed_dim = int(embed_dim)
        self.image_size = int(image_size)
        self.interpolation = interpolation if interpolation in _INTERPOLATIONS else "bicubic"
        self.weights_source = weights_source
        self.pretrained = weights_source != "random"
        # Non-persistent: they follow .to(device/dtype) but stay out of state_dict(), which then
        # holds exactly the backbone's weights.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PerceptualEncoder:
        """Ignore `mode`: the encoder is frozen by contract and stays in eval mode."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """images `(B, 3, H, W)` in [0, 1] -> embeddings `(B, embed_dim)` float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = resize_square(images.to(self.mean.dtype), self.image_size, self.interpolation)
        x = (x - self.mean) / self.std
        return self.backbone(x).float()

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, features={self.features!r}, embed_dim={self.embed_dim}, "
                f"image_size={self.image_size}, weights_source={self.weights_source!r}")


def resize_square(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Shorter side to `size`, then centre crop to `(size, size)`; differentiable.

    images `(B, C, H, W)` -> `(B, C, size, size)`. Antialiased when shrinking (512 px test images
    into a 224 px encoder would otherwise alias flare streaks). Bicubic may overshoot [0, 1]
    slightly; it is not clamped, which would zero the gradient there.
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images, size=(new_h, new_w), mode=mode, align_corners=False,
                      antialias=min(h, w) > size)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size]


def check_features(name: str, features: str) -> None:
    """UserError naming encoder `name` unless `features` is one of ENCODER_FEATURES."""
    if features not in ENCODER_FEATURES:
        raise UserError(f"encoder {name!r}: encoder_features={features!r} is invalid; expected "
                        f"one of {', '.join(ENCODER_FEATURES)}")
