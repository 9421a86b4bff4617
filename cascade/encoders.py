"""Perceptual encoders f for L_PL and L_triplet (`cascade.losses`), chosen by name, frozen.

Names (`build_encoder(name, pretrained, weights=None, image_size=None, features="cls")`):

- `vit_l16_swag_e2e` (search_spaces/table1.yaml, the paper's encoder as its text reads): ViT-L/16
  with `ViT_L_16_Weights.IMAGENET1K_SWAG_E2E_V1` at 512 px, through torchvision. The paper names
  "the ViT-Large model fine-tuned using large-scale weakly supervised learning" right after "recent
  models have exceeded 88 % top-1 accuracy": of torchvision's two SWAG ViT-L/16 weights only E2E
  (the SWAG trunk fine-tuned end to end on ImageNet-1K, 88.06 %) exceeds 88 %; LINEAR is 85.15 %.
  Its cost: 1024 tokens per image, about 6x LINEAR's compute per forward (362 vs 61.6 GFLOPs).
- `vit_l16_swag` (TrialConfig's default encoder): the LINEAR variant
  (`IMAGENET1K_SWAG_LINEAR_V1`, the frozen SWAG trunk with a linear ImageNet-1K head) at 224 px.
  The other defensible reading ("SWAG features" as the weakly-supervised trunk itself), 6x
  cheaper, and less upsampling of 128 px crops (1.75x against 4x); search_spaces/table1_flare7kpp.yaml
  keeps it for continuity with earlier runs.
- `small_cpu`: timm `resnet18` (torchvision's ImageNet weights, `resnet18.tv_in1k`) at 128 px, the
  paper's crop size, so the embedded CPU demo's crops are not resampled upwards. A ResNet rather
  than a tiny ViT: equally fast on CPU at 128 px, and with random weights (the demo has no internet)
  convolutions with a global pool still respond to local structure such as flare streaks.
- `flare_seg` (the embedded demo's default): a small CNN trained on the procedural benchmark to
  segment streak, glare and light source, built once and cached (`cascade.demo_encoder`, which
  says why and what it learned); its embedding is its standardised, pooled last feature map.
  `pretrained=False` gives its random initialisation.
- `timm:<model>`: any timm model name, tag allowed
  (`timm:vit_large_patch16_224.augreg_in21k_ft_in1k`, `timm:vgg19.tv_in1k`); the embedding is the pre-logits feature
  (`forward_head(forward_features(x), pre_logits=True)`), the classifier itself is dropped.

Features (`features`, `ENCODER_FEATURES`): the paper takes "the feature maps of the activation
layer just before the output layer", which may mean the pooled embedding or the unpooled map:

- `cls` (the default; what these encoders always returned): the embedding that feeds the
  classifier, `(B, D)`: for the torchvision ViTs the final class token after the last LayerNorm;
  for timm models the pre-logits feature (a ViT's class token or pooled tokens, a CNN's global
  average pool: `small_cpu` gives 512 values).
- `tokens`: the unpooled features, flattened to `(B, N*D)` so the `(B, embed_dim)` contract holds
  (`embed_dim == N*D`): for the torchvision ViTs the N = (image_size / 16)^2 patch tokens after
  the last LayerNorm (the class token is attended to but dropped; 196 x 1024 at 224 px), in
  row-major patch order; for timm models what `forward_features` returns, i.e. what
  `forward_head` would pool, with the prefix (class / register) tokens of a ViT dropped: a CNN's
  last activation map `(C, h, w)` (`small_cpu` at 128 px: the 512 x 4 x 4 ReLU output of
  resnet18's last block, right before its pool and classifier), a ViT's patch tokens (after its
  final norm; before it for ViTs built with average pooling, whose norm sits in the head).
  Models whose `forward_features` does not return one `(B, N, D)` or `(B, C, h, w)` tensor are
  refused with a UserError when built. `cascade.losses` takes its distances over all N*D values
  of a sample, so the `mean` reduction is the mean over tokens of each token's MSE.

Every encoder maps `(B, 3, H, W)` in [0, 1] to `(B, D)` float32 in three differentiable steps
(`F.interpolate`, not PIL, so the anchor's gradient flows through them): resize the shorter side to
the encoder's input size with the weights' own interpolation (bicubic for SWAG, bilinear for
torchvision's resnet18), antialiased when shrinking, and centre-crop to a square; subtract the
weights' mean and divide by their std; run the network. The classification crop (timm's
`crop_pct`, e.g. resize 256 -> crop 224) is deliberately not applied: it is an evaluation trick for
classifiers, and here it would hide flare residue near the image border from the loss.

Weights: `pretrained=True` goes through the library's own cache and download (torch hub for
torchvision, the Hugging Face Hub for timm); offline that fails with one `UserError` saying how to
supply the file. `weights=PATH` loads a local state dict (.pth/.pt/.bin or .safetensors, as the
library saves or publishes it) strictly: every tensor of the trunk must be there with its shape.
`pretrained=False` gives random weights and is recorded as `weights_source == "random"`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from cascade.demo_encoder import build_demo_encoder
from cascade.errors import UserError, brief
from cascade.perceptual import ENCODER_FEATURES, PerceptualEncoder, check_features, resize_square

__all__ = ["ENCODERS", "ENCODER_FEATURES", "PerceptualEncoder", "build_encoder",
           "check_encoder_name", "resize_square"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TIMM_PREFIX = "timm:"
# -- torchvision ViT-L/16 (SWAG) ---------------------------------------------------------------

@dataclass(frozen=True)
class TorchvisionViT:
    """A torchvision VisionTransformer configuration and its weights enum member."""

    weights: str  # member of torchvision.models.ViT_L_16_Weights
    image_size: int
    patch_size: int = 16
    num_layers: int = 24
    num_heads: int = 16
    hidden_dim: int = 1024
    mlp_dim: int = 4096


VIT_L16_SWAG_LINEAR = TorchvisionViT("IMAGENET1K_SWAG_LINEAR_V1", image_size=224)
VIT_L16_SWAG_E2E = TorchvisionViT("IMAGENET1K_SWAG_E2E_V1", image_size=512)


class ViTPatchTokens(nn.Module):
    """A torchvision VisionTransformer returning its patch tokens after the final LayerNorm.

    `(B, 3, S, S)` -> `(B, N * hidden_dim)`, N = (S / patch_size)^2 in row-major patch order. The
    same computation as `VisionTransformer.forward` up to its `x[:, 0]` (torchvision 0.29,
    torchvision/models/vision_transformer.py:289), which keeps the class token instead.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        vit = self.vit
        x = vit._process_input(x)  # (B, N, D)
        cls = vit.class_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = vit.encoder(torch.cat([cls, x], dim=1))  # (B, 1 + N, D), after encoder.ln
        return x[:, 1:].flatten(1)  # the class token took part in attention; it is dropped here


def build_torchvision_vit(
    spec: TorchvisionViT,
    name: str,
    pretrained: bool,
    weights: str | None = None,
    image_size: int | None = None,
    features: str = "cls",
) -> PerceptualEncoder:
    """A torchvision ViT whose embedding is the final class token `(B, hidden_dim)` (`cls`) or
    its patch tokens `(B, N * hidden_dim)` (`tokens`), both after the last LayerNorm.

    `image_size` (a multiple of the patch size) overrides the weights' native size; pretrained
    position embeddings are then interpolated to the new grid (torchvision's
    `interpolate_embeddings`).
    """
    check_features(name, features)
    from torchvision.models import ViT_L_16_Weights
    from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

    size = spec.image_size if image_size is None else image_size
    if size % spec.patch_size:
        raise UserError(f"encoder {name!r}: image_size={size} is not a multiple of the patch size "
                        f"{spec.patch_size}")
    # Weights first: an offline failure then costs no time building a 300M-parameter network.
    state, source = None, "random"
    if pretrained and weights is not None:
        state, source = _read_local(weights), str(_existing(weights))
    elif pretrained:
        enum = getattr(ViT_L_16_Weights, spec.weights)
        source = f"torchvision:ViT_L_16_Weights.{spec.weights}"
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as exc:  # no network, refused, or a corrupt download
            filename = enum.url.rsplit("/", 1)[-1]
            raise UserError(
                f"cannot get the pretrained weights of encoder {name!r} ({source}: "
                f"{brief(exc)}). Without internet, download {enum.url} elsewhere, then "
                f"either set `encoder_weights: /path/to/{filename}` or put the file at "
                f"{Path(torch.hub.get_dir()) / 'checkpoints' / filename} (the torch hub cache; "
                "TORCH_HOME moves it). For a CPU demo only, `encoder_pretrained: false` uses "
                "random weights (recorded in the results)."
            ) from exc
    if state is not None:
        # The classifier is dropped: the embedding is the token that would feed it.
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        pos = state.get("encoder.pos_embedding")
        if pos is not None and pos.shape[1] != (size // spec.patch_size) ** 2 + 1:
            try:
                state = interpolate_embeddings(size, spec.patch_size, state)
            except ValueError as exc:
                raise UserError(f"encoder {name!r}: cannot resize the position embedding of "
                                f"{source} to {size} px: {exc}") from exc
    # With weights to load, build on the meta device: a random init of ViT-L that would be
    # overwritten anyway takes seconds; load_state_dict(assign=True) then materialises it.
    with torch.device("meta" if state is not None else "cpu"):
        model = VisionTransformer(
            image_size=size, patch_size=spec.patch_size, num_layers=spec.num_layers,
            num_heads=spec.num_heads, hidden_dim=spec.hidden_dim, mlp_dim=spec.mlp_dim,
        )
    model.heads = nn.Identity()  # forward() now returns the class token (B, hidden_dim)
    if state is not None:
        _load_strict(model, state, name, source)
    backbone: nn.Module = model
    embed_dim = spec.hidden_dim
    if features == "tokens":
        backbone = ViTPatchTokens(model)
        embed_dim = (size // spec.patch_size) ** 2 * spec.hidden_dim
    return PerceptualEncoder(
        backbone, name=name, embed_dim=embed_dim, image_size=size, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, interpolation="bicubic", weights_source=source, features=features,
    )


# -- timm ----------------------------------------------------------------------------------------

class TimmPreLogits(nn.Module):
    """A timm model returning its pre-logits features `(B, D)` instead of class scores."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class TimmTokens(nn.Module):
    """A timm model returning its unpooled `forward_features`, flattened to `(B, N*D)`.

    A 3-D output `(B, T, D)` (ViTs) loses its first `num_prefix_tokens` (class / register tokens);
    a 4-D one (CNNs: `(B, C, h, w)`, some hierarchical models `(B, h, w, C)`) is kept whole, its
    layout irrelevant to a distance over all elements. Anything else is a UserError naming `name`.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model.forward_features(x)
        if not isinstance(out, Tensor) or out.dim() not in (3, 4):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(f"encoder {self.name!r}: encoder_features=tokens needs forward_features "
                            f"to return one (B, N, D) or (B, C, H, W) tensor, got {got}; use "
                            "encoder_features: cls")
        if out.dim() == 3:
            out = out[:, self.num_prefix_tokens:]  # (B, N, D): patch tokens only
        return out.flatten(1)


def build_timm(
    model_name: str,
    name: str,
    pretrained: bool,
    weights: str | None = None,
    image_size: int | None = None,
    default_image_size: int | None = None,
    features: str = "cls",
) -> PerceptualEncoder:
    """Any timm model (`arch` or `arch.tag`) as a pre-logits (`cls`) or unpooled (`tokens`)
    feature extractor.

    Input size: `image_size`, else `default_image_size`, else the weights' own input size. Models
    with a fixed input size (ViTs) are built for that size; timm resamples their pretrained position
    embeddings. Mean, std and interpolation come from the weights' data config. With `tokens`,
    `embed_dim` is measured by one forward pass of a single image at the input size (it also
    refuses models whose features are not one tensor, at build time rather than on the first step).
    """
    check_features(name, features)
    import timm
    from timm.data import resolve_model_data_config
    from timm.models import get_pretrained_cfg

    check_timm_name(model_name)
    cfg = get_pretrained_cfg(model_name)  # None for the rare model without a pretrained config
    native = cfg.input_size[-1] if cfg is not None else None
    size = image_size or default_image_size or native
    kwargs: dict = {}
    if cfg is not None and cfg.fixed_input_size and size != native:
        kwargs["img_size"] = size
    source = "random"
    if pretrained and weights is not None:
        path = _existing(weights)
        # Through timm's own loader, so its per-model checkpoint filters (position-embedding
        # resampling, format conversions) apply; strict, because the head is kept at load time.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path), "source": ""}
        source = str(path)
    elif pretrained:
        tag = cfg.tag if cfg is not None and cfg.tag else ""
        source = f"timm:{model_name.split('.')[0]}" + (f".{tag}" if tag else "")
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise
        if weights is not None:
            raise UserError(f"encoder {name!r}: cannot load weights from {source}: "
                            f"{brief(exc)}") from exc
        raise UserError(_timm_offline_message(name, source, cfg, exc)) from exc
    model.reset_classifier(0)  # the head is never used; frees its memory (21k-class heads)
    data = resolve_model_data_config(model)
    size = size or data["input_size"][-1]
    backbone: nn.Module
    if features == "tokens":
        backbone = TimmTokens(model.eval(), name)
        with torch.no_grad():
            embed_dim = backbone(torch.zeros(1, 3, size, size)).shape[1]
    else:
        backbone = TimmPreLogits(model)
        embed_dim = getattr(model, "head_hidden_size", None) or model.num_features
    return PerceptualEncoder(
        backbone, name=name, embed_dim=embed_dim, image_size=size,
        mean=tuple(data["mean"]), std=tuple(data["std"]),
        interpolation=data.get("interpolation", "bicubic"), weights_source=source,
        features=features,
    )


def check_timm_name(model_name: str) -> None:
    """UserError unless `model_name` (`arch` or `arch.tag`) is a timm model; builds nothing."""
    import timm

    arch, _, tag = model_name.partition(".")
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(_TIMM_PREFIX + c for c in close)}?)" if close else ""
        raise UserError(f"unknown encoder {_TIMM_PREFIX + model_name!r}: {arch!r} is not a timm "
                        f"model{hint}; see timm.list_models()")
    if tag and model_name not in timm.list_pretrained(model_name):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(arch + ".*")]
        raise UserError(f"unknown encoder {_TIMM_PREFIX + model_name!r}: timm has no weights tagged "
                        f"{tag!r} for {arch}; tags: {', '.join(tags) or 'none'}")


def _timm_offline_message(name: str, source: str, cfg: object, exc: BaseException) -> str:
    hub_id = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None)
    if hub_id:
        where = (f"download them elsewhere (`hf download {hub_id}`) and either set "
                 "`encoder_weights: /path/to/model.safetensors`, or copy that Hugging Face cache "
                 "to this machine (HF_HOME or HF_HUB_CACHE) and set HF_HUB_OFFLINE=1")
    else:
        filename = (url or "weights.pth").rsplit("/", 1)[-1]
        where = (f"download {url} elsewhere and either set `encoder_weights: /path/to/{filename}` "
                 f"or put it under {Path(torch.hub.get_dir()) / 'checkpoints'} (the torch hub cache)")
    return (f"cannot get the pretrained weights of encoder {name!r} ({source}: {brief(exc)}). "
            f"Without internet, {where}. For a CPU demo only, `encoder_pretrained: false` uses "
            "random weights (recorded in the results).")


# -- names ---------------------------------------------------------------------------------------

ENCODERS: dict[str, Callable[..., PerceptualEncoder]] = {
    "vit_l16_swag": partial(build_torchvision_vit, VIT_L16_SWAG_LINEAR, "vit_l16_swag"),
    "vit_l16_swag_e2e": partial(build_torchvision_vit, VIT_L16_SWAG_E2E, "vit_l16_swag_e2e"),
    "small_cpu": partial(build_timm, "resnet18.tv_in1k", "small_cpu", default_image_size=128),
    "flare_seg": build_demo_encoder,
}
"""Encoder name -> builder(pretrained, weights=None, image_size=None, features="cls"). Names
starting with `timm:` are handled by `build_encoder` and need no entry."""


def check_encoder_name(name: str) -> None:
    """UserError naming the valid choices unless `name` is buildable; builds nothing."""
    if isinstance(name, str) and name.startswith(_TIMM_PREFIX):
        check_timm_name(name[len(_TIMM_PREFIX):])
    elif name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; expected one of {', '.join(ENCODERS)}, "
                        f"or {_TIMM_PREFIX}<model> for any timm model (e.g. timm:resnet50)")


def build_encoder(
    name: str,
    pretrained: bool,
    weights: str | None = None,
    image_size: int | None = None,
    features: str = "cls",
) -> PerceptualEncoder:
    """The frozen, eval-mode encoder `name` on CPU (move it with `.to(device)`).

    pretrained: True for the library's weights (or `weights`, a local state-dict file); False for
    random weights, only when asked for explicitly (the CPU demo). image_size: side of the square
    the input is resized to; None keeps the encoder's own (224 for vit_l16_swag). features: `cls`
    (pooled embedding, `(B, D)`) or `tokens` (unpooled, `(B, N*D)`); see the module docstring.
    """
    check_encoder_name(name)
    check_features(name, features)
    if weights is not None and not pretrained:
        raise UserError(f"encoder {name!r}: encoder_weights={weights!r} is given but "
                        "encoder_pretrained is false; set it to true to load the file")
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise UserError(f"encoder {name!r}: image_size={image_size!r} must be a positive integer")
    if name.startswith(_TIMM_PREFIX):
        return build_timm(name[len(_TIMM_PREFIX):], name, pretrained, weights, image_size,
                          features=features)
    return ENCODERS[name](pretrained, weights, image_size, features=features)


# -- local weight files --------------------------------------------------------------------------

def _existing(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"encoder_weights: {weights} does not exist or is not a file")
    return path.resolve()


def _read_local(weights: str) -> dict[str, Tensor]:
    """A state dict from a .pth/.pt/.bin (torch.load, weights only) or .safetensors file.

    Unwraps `state_dict` / `model` / EMA entries and strips DDP's `module.` prefix (timm's loader).
    """
    from timm.models import load_state_dict

    path = _existing(weights)
    try:
        return load_state_dict(str(path))
    except Exception as exc:  # unpickling / safetensors errors have no common base class
        raise UserError(f"encoder_weights: cannot read {path} as a state dict: "
                        f"{brief(exc)}") from exc


def _load_strict(model: nn.Module, state: dict[str, Tensor], name: str, source: str) -> None:
    """Load `state` into `model`; any missing, unexpected or mis-shaped tensor is a UserError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("shape mismatch", shapes)) if keys]
        raise UserError(f"encoder {name!r}: weights {source} do not fit the network; "
                        + "; ".join(parts))
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError(f"{name}: tensors left on the meta device after loading")  # a bug here


