"""Uformer (Wang et al., 2022) exactly as Flare7K / Flare7K++ configure and release it.

The module and parameter names reproduce the released checkpoints' state dict (including the
`dowsample_N` spelling), so `net_g_last.pth` files load strictly. The Flare7K variant is the plain
Uformer: LeWin blocks (pre-norm window attention with a learned relative position bias, then a
GELU feed-forward net), no modulator, no cross-attention, no final norm, no global residual, and a
sigmoid on the output. `output_ch=6` predicts the deflared image (channels 0:3) and the flare
(3:6), as both released Uformers do (Flare7K v1 and Flare7K++; which one a checkpoint is, is
`TrialConfig.base_kind`); `output_ch=3` is a variant with the deflared image only.

Two things differ from the reference code on purpose, neither changing its numbers on the 512x512
inputs it was released for: images of any size are reflect-padded to the network's stride and
cropped back (the reference assumes square inputs of a fixed size), and attention runs through
`F.scaled_dot_product_attention` on all windows at once, with the shift masks cached per size.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from cascade.errors import UserError, first_line
from cascade.io import atomic_path

# The Uformer constructor arguments, i.e. the keys of `Uformer.arch`.
ARCH_KEYS = ("img_size", "img_ch", "output_ch", "embed_dim", "depths", "num_heads", "win_size",
             "mlp_ratio", "qkv_bias", "drop_path_rate", "token_projection", "token_mlp")
TOKEN_PROJECTIONS = ("linear",)
TOKEN_MLPS = ("ffn",)
# The nine stages in forward order, with the downsampling level of their feature maps.
STAGES: tuple[tuple[str, int], ...] = (
    ("encoderlayer_0", 0), ("encoderlayer_1", 1), ("encoderlayer_2", 2), ("encoderlayer_3", 3),
    ("conv", 4),
    ("decoderlayer_0", 3), ("decoderlayer_1", 2), ("decoderlayer_2", 1), ("decoderlayer_3", 0),
)
# The reference shift mask's fill value for token pairs that were not neighbours before the roll.
_MASK_FILL = -100.0


# ------------------------------------------------------------------------------------------------
# Windows
def window_partition(x: Tensor, win: int) -> Tensor:
    """(B, H, W, C) -> (B, nW, win*win, C), windows in row-major order; H, W multiples of win."""
    B, H, W, C = x.shape
    x = x.view(B, H // win, win, W // win, win, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // win) * (W // win), win * win, C)


def window_reverse(windows: Tensor, win: int, H: int, W: int) -> Tensor:
    """Inverse of `window_partition`: (B, nW, win*win, C) -> (B, H, W, C)."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // win, W // win, win, win, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def shift_attention_mask(H: int, W: int, win: int, shift: int, device: torch.device) -> Tensor:
    """Additive attention mask of a shifted-window block, for a (H, W) feature map.

    After the cyclic roll by -shift, a window at the bottom/right border mixes tokens from opposite
    sides of the image; they must not attend to each other. Tokens are labelled by which of the
    three bands (rows [0, H-win), [H-win, H-shift), [H-shift, H), likewise for columns) they lie
    in, as in Swin/Uformer; pairs with different labels get -100.

    Returns:
        (nW, win*win, win*win) float32 with values in {0, -100}; cached per size and device
        (built in the graph instead under torch.compile, which would otherwise warn about the cache).
    """
    if torch.compiler.is_compiling():
        return _build_shift_mask(H, W, win, shift, device)
    return _cached_shift_mask(H, W, win, shift, device)


def _build_shift_mask(H: int, W: int, win: int, shift: int, device: torch.device) -> Tensor:
    def bands(n: int) -> Tensor:
        idx = torch.arange(n, device=device)
        return (idx >= n - win).long() + (idx >= n - shift).long()  # 0, 1, 2

    labels = bands(H)[:, None] * 3 + bands(W)[None, :]  # (H, W)
    windows = window_partition(labels[None, :, :, None], win)[0, :, :, 0]  # (nW, N)
    differs = windows[:, :, None] != windows[:, None, :]  # (nW, N, N)
    return differs.float() * _MASK_FILL


@functools.lru_cache(maxsize=64)
def _cached_shift_mask(H: int, W: int, win: int, shift: int, device: torch.device) -> Tensor:
    # An ordinary tensor even when first built under inference_mode, since the same cached mask
    # later serves training, where inference tensors are restricted (no saving for backward).
    with torch.inference_mode(False), torch.no_grad():
        return _build_shift_mask(H, W, win, shift, device)


def relative_position_index(win: int) -> Tensor:
    """(win*win, win*win) long: index into the (2*win-1)**2 bias table for each token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)  # (N, N, 2) >= 0
    return rel[..., 0] * (2 * win - 1) + rel[..., 1]


# ------------------------------------------------------------------------------------------------
# Building blocks (names match the released state dict)
class LinearProjection(nn.Module):
    """Token projection 'linear': q from one Linear, k and v from another (`to_q`, `to_kv`)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., N, C) -> q, k, v each (..., heads, N, C // heads); channels split head-major."""
        *lead, N, C = x.shape
        h = self.num_heads
        q = self.to_q(x).view(*lead, N, h, C // h).transpose(-3, -2)
        kv = self.to_kv(x).view(*lead, N, 2, h, C // h)
        k = kv[..., 0, :, :].transpose(-3, -2)
        v = kv[..., 1, :, :].transpose(-3, -2)
        return q, k, v


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, win: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise UserError(f"Uformer: a stage width of {dim} is not divisible by {num_heads} heads")
        self.dim, self.win, self.num_heads = dim, win, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win - 1) ** 2, num_heads))
        # Persistent: the released checkpoints contain it, and strict loading expects it.
        self.register_buffer("relative_position_index", relative_position_index(win))
        self.qkv = LinearProjection(dim, num_heads, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """(heads, N, N) additive bias, N = win*win."""
        N = self.win * self.win
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, nW, N, C) windows; mask: (nW, N, N) additive or None. Returns (B, nW, N, C)."""
        B, nW, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x)  # (B, nW, h, N, d)
        bias = self.position_bias()  # (h, N, N)
        if mask is None:
            # Same bias for every window: fold windows into the batch, broadcast the bias.
            q, k, v = (t.reshape(B * nW, h, N, C // h) for t in (q, k, v))
            attn_mask = bias.unsqueeze(0)  # (1, h, N, N)
        else:
            # Bias differs per window: fold windows into the head axis, broadcast over the batch.
            q, k, v = (t.reshape(B, nW * h, N, C // h) for t in (q, k, v))
            attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, nW * h, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), scale=self.scale)
        out = out.view(B, nW, h, N, C // h).transpose(2, 3).reshape(B, nW, N, C)
        return self.proj(out)


class FeedForward(nn.Module):
    """Token MLP 'ffn': Linear -> GELU -> Linear (`fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LeWinBlock(nn.Module):
    """x + W-MSA(LN(x)), then x + FFN(LN(x)); every other block uses shifted windows."""

    def __init__(self, dim: int, num_heads: int, win: int, shift: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        self.win, self.shift = win, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, win, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C); H and W multiples of the window size."""
        B, H, W, C = x.shape
        y = self.norm1(x)
        mask = None
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shift_attention_mask(H, W, self.win, self.shift, x.device)
        y = window_reverse(self.attn(window_partition(y, self.win), mask), self.win, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class UformerStage(nn.Module):
    """A sequence of LeWin blocks at one resolution (the reference's BasicUformerLayer)."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, win_size: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: list[float]) -> None:
        super().__init__()
        # As in the reference: a stage whose nominal feature map (img_size / 2**level) is no
        # larger than a window uses one unshifted window of that size.
        win, shift = win_size, win_size // 2
        if resolution <= win_size:
            win, shift = resolution, 0
        self.win = win
        self.blocks = nn.ModuleList(
            LeWinBlock(dim, num_heads, win, 0 if i % 2 == 0 else shift, mlp_ratio, qkv_bias,
                       drop_path[i])
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Downsample(nn.Module):
    """4x4 stride-2 conv: (B, H, W, Cin) -> (B, H/2, W/2, Cout)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Upsample(nn.Module):
    """2x2 stride-2 transposed conv: (B, H, W, Cin) -> (B, 2H, 2W, Cout)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.deconv = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class InputProj(nn.Module):
    """3x3 conv + LeakyReLU: (B, Cin, H, W) image -> (B, H, W, C) tokens."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class OutputProj(nn.Module):
    """3x3 conv: (B, H, W, C) tokens -> (B, Cout, H, W) logits."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 3, 1, 2))


# ------------------------------------------------------------------------------------------------
class Uformer(nn.Module):
    """The Flare7K Uformer. Arguments mean what they mean in Flare7K's option files.

    `img_size` only decides, as in the reference, which stages are too small for shifted windows
    (those whose img_size / 2**level <= win_size); inputs of any size are accepted.
    `drop_path_rate` is stochastic depth (training only), linear over the encoder, mirrored in the
    decoder, at its maximum in the bottleneck.
    """

    def __init__(
        self,
        img_size: int = 512,
        img_ch: int = 3,
        output_ch: int = 6,
        embed_dim: int = 32,
        depths: tuple[int, ...] | list[int] = (2,) * 9,
        num_heads: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16, 16, 8, 4, 2),
        win_size: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        token_projection: str = "linear",
        token_mlp: str = "ffn",
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        if len(depths) != 9 or len(num_heads) != 9:
            raise UserError(f"Uformer: depths and num_heads need 9 entries, got {len(depths)} and "
                            f"{len(num_heads)}")
        if token_projection not in TOKEN_PROJECTIONS:
            raise UserError(f"Uformer: token_projection={token_projection!r} is not supported; "
                            f"expected one of {', '.join(TOKEN_PROJECTIONS)}")
        if token_mlp not in TOKEN_MLPS:
            raise UserError(f"Uformer: token_mlp={token_mlp!r} is not supported; expected one of "
                            f"{', '.join(TOKEN_MLPS)}")
        if min(img_size, img_ch, output_ch, embed_dim, win_size, *depths, *num_heads) < 1:
            raise UserError("Uformer: sizes, channels, depths and heads must be >= 1")
        if img_size < 16:
            raise UserError(f"Uformer: img_size={img_size} is too small for four downsamplings")
        self._arch: dict[str, Any] = {
            "img_size": int(img_size), "img_ch": int(img_ch), "output_ch": int(output_ch),
            "embed_dim": int(embed_dim), "depths": list(depths), "num_heads": list(num_heads),
            "win_size": int(win_size), "mlp_ratio": float(mlp_ratio), "qkv_bias": bool(qkv_bias),
            "drop_path_rate": float(drop_path_rate), "token_projection": token_projection,
            "token_mlp": token_mlp,
        }

        e = embed_dim
        enc_rates = torch.linspace(0, drop_path_rate, sum(depths[:4])).tolist()
        dec_rates = enc_rates[::-1]
        rates = [enc_rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(4)]
        rates.append([drop_path_rate] * depths[4])
        rates += [dec_rates[sum(depths[5:5 + i]):sum(depths[5:6 + i])] for i in range(4)]
        # The reference indexes these lists per block; pad (with 0: no stochastic depth) where a
        # decoder stage is deeper than its encoder mirror instead of failing.
        rates = [r + [0.0] * (d - len(r)) for r, d in zip(rates, depths)]
        widths = (e, 2 * e, 4 * e, 8 * e, 16 * e, 16 * e, 8 * e, 4 * e, 2 * e)

        self.input_proj = InputProj(img_ch, e)
        self.output_proj = OutputProj(2 * e, output_ch)
        # Upsampling halves the width of its input; the skip connection then restores it.
        up_in, up_out = (16 * e, 16 * e, 8 * e, 4 * e), (8 * e, 4 * e, 2 * e, e)
        # Registered in the reference's order, so state_dict() lists tensors as the releases do.
        for i, (name, level) in enumerate(STAGES):
            if i >= 5:
                self.add_module(f"upsample_{i - 5}", Upsample(up_in[i - 5], up_out[i - 5]))
            stage = UformerStage(widths[i], img_size // 2**level, depths[i], num_heads[i], win_size,
                                 mlp_ratio, qkv_bias, rates[i])
            self.add_module(name, stage)
            if i < 4:
                self.add_module(f"dowsample_{i}", Downsample(widths[i], 2 * widths[i]))  # sic
        self.apply(_init_weights)

        # Every stage's feature side must be a multiple of its window: input sides are padded to
        # the least common multiple of 2**level * window over the stages (128 for Flare7K).
        self.stride = math.lcm(*(2**level * getattr(self, name).win for name, level in STAGES))

    @property
    def arch(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able): `Uformer(**m.arch)` rebuilds the same network."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._arch.items()}

    def forward(self, x: Tensor) -> Tensor:
        """(B, img_ch, H, W) in [0, 1], any H, W -> (B, output_ch, H, W) in (0, 1)."""
        H, W = x.shape[-2:]
        pad_h, pad_w = -H % self.stride, -W % self.stride
        if pad_h or pad_w:
            # Reflect keeps image statistics at the border; it needs pad < side, so very small
            # images fall back to repeating the edge.
            mode = "reflect" if pad_h < H and pad_w < W else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)

        conv0 = self.encoderlayer_0(self.input_proj(x))  # (B, H, W, e)
        conv1 = self.encoderlayer_1(self.dowsample_0(conv0))  # (B, H/2, W/2, 2e)
        conv2 = self.encoderlayer_2(self.dowsample_1(conv1))  # (B, H/4, W/4, 4e)
        conv3 = self.encoderlayer_3(self.dowsample_2(conv2))  # (B, H/8, W/8, 8e)
        conv4 = self.conv(self.dowsample_3(conv3))  # (B, H/16, W/16, 16e)
        y = self.decoderlayer_0(torch.cat([self.upsample_0(conv4), conv3], -1))  # 16e
        y = self.decoderlayer_1(torch.cat([self.upsample_1(y), conv2], -1))  # 8e
        y = self.decoderlayer_2(torch.cat([self.upsample_2(y), conv1], -1))  # 4e
        y = self.decoderlayer_3(torch.cat([self.upsample_3(y), conv0], -1))  # 2e
        y = torch.sigmoid(self.output_proj(y))
        return y[..., :H, :W]


def _init_weights(m: nn.Module) -> None:
    """The reference initialisation: truncated-normal Linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# Checkpoints
def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """State dict and (for flaresweep's own files) the recorded arch of a checkpoint file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for non-checkpoints; all mean "unreadable"
        first = first_line(exc, type(exc).__name__)
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    arch = None
    if isinstance(obj, dict) and isinstance(obj.get("params_ema"), dict):
        state = obj["params_ema"]  # BasicSR with EMA: the weights Flare7K evaluates
    elif isinstance(obj, dict) and isinstance(obj.get("params"), dict):
        state = obj["params"]
        arch = obj.get("arch") if isinstance(obj.get("arch"), dict) else None
    else:
        state = obj
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: expected a state dict (name -> tensor), optionally under "
                        f"'params_ema' or 'params'; found {_describe(obj)}")
    # Files saved from DistributedDataParallel carry a `module.` prefix on every name.
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, arch


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:5]
        return f"a dict with keys {keys}" + (" ..." if len(obj) > 5 else "")
    return f"a {type(obj).__name__}"


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a Uformer checkpoint: BasicSR (`params_ema` preferred over `params`), a bare state
    dict, or flaresweep's own; a DDP `module.` prefix is stripped. UserError naming the file."""
    return _read(path)[0]


def infer_arch(state: dict[str, Tensor], where: str = "state dict") -> dict[str, Any]:
    """Uformer constructor arguments implied by a state dict's names and shapes.

    `img_size` is only visible where a stage's window was clamped (a small img_size); otherwise the
    Flare7K value 512 is assumed. `drop_path_rate` does not show in weights; the default is kept.
    """

    def get(name: str) -> Tensor:
        if name not in state:
            raise UserError(f"{where}: not a Flare7K Uformer state dict (no {name!r})")
        return state[name]

    arch: dict[str, Any] = {}
    w_in = get("input_proj.proj.0.weight")  # (embed_dim, img_ch, 3, 3)
    arch["embed_dim"], arch["img_ch"] = int(w_in.shape[0]), int(w_in.shape[1])
    arch["output_ch"] = int(get("output_proj.proj.0.weight").shape[0])
    depths, heads, wins = [], [], []
    for name, _ in STAGES:
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{name}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise UserError(f"{where}: not a Flare7K Uformer state dict (no blocks in {name!r})")
        depths.append(max(blocks) + 1)
        table = get(f"{name}.blocks.0.attn.relative_position_bias_table")  # ((2w-1)^2, heads)
        heads.append(int(table.shape[1]))
        wins.append((math.isqrt(int(table.shape[0])) + 1) // 2)
    arch["depths"], arch["num_heads"], arch["win_size"] = depths, heads, max(wins)
    arch["img_size"] = 512
    clamped = [(win, level) for (win, (_, level)) in zip(wins, STAGES) if win < arch["win_size"]]
    if clamped:
        win, level = clamped[0]
        arch["img_size"] = win * 2**level  # that stage's nominal side equals its window
    fc1 = get("encoderlayer_0.blocks.0.mlp.fc1.weight")  # (hidden, embed_dim)
    arch["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    arch["qkv_bias"] = "encoderlayer_0.blocks.0.attn.qkv.to_q.bias" in state
    get("encoderlayer_0.blocks.0.attn.qkv.to_q.weight")  # only the 'linear' projection exists here
    return arch


def load_checkpoint(path: str | os.PathLike, **overrides: Any) -> Uformer:
    """Build the Uformer a checkpoint file describes and load its weights strictly.

    The architecture is the one recorded in a flaresweep checkpoint, else inferred from the tensor
    names and shapes (`infer_arch`); `overrides` (Uformer arguments) win over both.
    Raises UserError naming the file if it is unreadable or its tensors do not fit.
    """
    state, recorded = _read(path)
    arch = dict(recorded) if recorded is not None else infer_arch(state, where=str(path))
    known = set(ARCH_KEYS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"load_checkpoint({path}): unknown Uformer argument {unknown[0]!r}")
    arch.update(overrides)
    try:
        model = Uformer(**{k: v for k, v in arch.items() if k in known})
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    check_state_dict(model, state, where=str(path))
    model.load_state_dict(state, strict=True)
    return model


def check_state_dict(model: nn.Module, state: dict[str, Tensor], where: str, show: int = 5) -> None:
    """Raise one UserError listing (the first few) missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - show} more)" if len(items) > show else ""
            problems.append(f"{len(items)} {label}: " + ", ".join(items[:show]) + more)
    if problems:
        raise UserError(f"{where}: weights do not fit the Uformer {getattr(model, 'arch', '')}; "
                        + "; ".join(problems))


def save_checkpoint(model: Uformer, path: str | os.PathLike) -> None:
    """Write `{"params": state_dict, "arch": model.arch}` atomically (tensors moved to CPU)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save({"params": state, "arch": model.arch}, tmp)
