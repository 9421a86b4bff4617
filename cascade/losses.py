"""Losses of the cascaded fine-tuning paper (Song & Bae).

The anchor network is fine-tuned with

    L = lambda_ * L_REG(k) + delta * L_PL + (1 - lambda_) * L_triplet(margin)

where, with f a frozen perceptual encoder (`cascade.encoders`):

- L_REG = ||anchor - positive||_k^k as a mean over pixels (k=1: MAE, k=2: MSE);
- L_PL = ||f(anchor) - f(positive)||^2 as a mean over the embedding (MSE);
- L_triplet = mean over the batch of [||f(a) - f(p)||^2 - ||f(a) - f(n)||^2 + margin]_+, each
  squared distance an MSE over the embedding, as the paper writes it.

`anchor` is the second (fine-tuned) network's output, `positive` the ground truth and `negative`
the first network's output (the hard negative: the same scene with flare left in it). All images
are `(B, 3, H, W)` in [0, 1].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The default weights are defined (and their choice explained) in cascade.config, which must import
# without torch; they are re-exported here, beside the loss they parametrise.
from cascade.config import DEFAULT_DELTA, DEFAULT_MARGIN


class LossTerms(NamedTuple):
    """One evaluation of the cascade loss; every field is a 0-dim float tensor.

    `reg`, `perceptual` and `triplet` are the unweighted terms; `total` is their weighted sum
    (the only one carrying gradients that should be back-propagated). A term whose weight is 0 is
    not computed and reads exactly 0.
    """

    total: Tensor
    reg: Tensor
    perceptual: Tensor
    triplet: Tensor


def l_reg(anchor: Tensor, positive: Tensor, k: int) -> Tensor:
    """The paper's ||anchor - positive||_k^k as a mean over all elements (0-dim tensor).

    anchor, positive: `(B, C, H, W)` in [0, 1]. k=1: mean absolute error; k=2: mean squared error.
    """
    _check_k(k)
    if anchor.shape != positive.shape:
        raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} differ in shape")
    return F.l1_loss(anchor, positive) if k == 1 else F.mse_loss(anchor, positive)


def l_perceptual(fa: Tensor, fp: Tensor) -> Tensor:
    """Mean squared distance between embeddings `(B, D)`, averaged over batch and dimension."""
    return F.mse_loss(fa, fp)


def l_triplet(fa: Tensor, fp: Tensor, fn: Tensor, margin: float = DEFAULT_MARGIN) -> Tensor:
    """Mean over the batch of [d(fa, fp) - d(fa, fn) + margin]_+, d = MSE over the embedding.

    fa, fp, fn: `(B, D)` embeddings of anchor, positive and negative; margin >= 0 (see
    DEFAULT_MARGIN). Returns a 0-dim tensor >= 0.
    """
    _check_nonnegative("margin", margin)
    d_pos = (fa - fp).pow(2).mean(dim=1)  # (B,)
    d_neg = (fa - fn).pow(2).mean(dim=1)  # (B,)
    return F.relu(d_pos - d_neg + margin).mean()


def cascade_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    encoder: nn.Module | None,
    k: int,
    lambda_: float,
    delta: float = DEFAULT_DELTA,
    margin: float = DEFAULT_MARGIN,
) -> LossTerms:
    """lambda_ * L_REG(k) + delta * L_PL + (1 - lambda_) * L_triplet(margin), with each term.

    anchor, positive, negative: `(B, 3, H, W)` in [0, 1]; only `anchor` needs gradients.
    encoder: frozen module `(B, 3, H, W) -> (B, D)` (a `cascade.encoders.PerceptualEncoder`);
    it may be None when lambda_ == 1 and delta == 0, the one setting where no term needs it.
    k in {1, 2}, lambda_ in [0, 1], delta >= 0, margin >= 0; otherwise ValueError naming the value.

    Work is skipped where a weight is 0 (this is the trainer's hot path):
    - lambda_ == 1 and delta == 0: the encoder is not called at all;
    - lambda_ == 1: f(negative) is not computed (the triplet's weight 1 - lambda_ is 0);
    - lambda_ == 0: L_REG is not computed.
    f(positive) and f(negative) are computed in one batched forward pass under `torch.no_grad`:
    they are targets, and a graph through a 300M-parameter encoder for them would only cost memory.
    (`torch.inference_mode` would be wrong: its tensors cannot be saved for the backward of the
    loss terms that mix them with the anchor's embedding.) f(anchor) keeps its graph, so gradients
    reach the anchor image and nothing else: positive and negative are treated as constants in
    every term, and the encoder's parameters are frozen.
    """
    _check_settings(encoder, k, lambda_, delta, margin)
    if not (anchor.shape == positive.shape == negative.shape) or anchor.dim() != 4:
        raise ValueError(
            "anchor, positive and negative must share one (B, 3, H, W) shape; got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )

    # Loss terms are computed in float32 even under bf16 autocast: the perceptual and triplet
    # terms are differences of small MSEs, which bf16's 8-bit mantissa would round away.
    zero = anchor.new_zeros((), dtype=torch.float32)
    # positive and negative are targets: no gradient reaches them, only the anchor.
    reg = l_reg(anchor.float(), positive.detach().float(), k) if lambda_ > 0 else zero
    total = lambda_ * reg if lambda_ > 0 else zero

    need_triplet = lambda_ < 1
    perceptual = triplet = zero
    if delta > 0 or need_triplet:
        assert encoder is not None  # _check_settings guarantees it
        targets = torch.cat([positive, negative]) if need_triplet else positive
        with torch.no_grad():
            f_targets = encoder(targets).float()  # (B or 2B, D)
        fp = f_targets[: anchor.shape[0]]
        fa = encoder(anchor).float()  # (B, D), with a graph back to the anchor
        if delta > 0:
            perceptual = l_perceptual(fa, fp)
            total = total + delta * perceptual
        if need_triplet:
            triplet = l_triplet(fa, fp, f_targets[anchor.shape[0]:], margin)
            total = total + (1.0 - lambda_) * triplet
    return LossTerms(total=total, reg=reg, perceptual=perceptual, triplet=triplet)


class CascadeLoss(nn.Module):
    """`cascade_loss` with its settings bound; holds the encoder so `.to(device)` moves it.

    forward(anchor, positive, negative) -> LossTerms; images `(B, 3, H, W)` in [0, 1].
    Settings are validated here, at construction, not on the first step.
    """

    def __init__(
        self,
        encoder: nn.Module | None,
        k: int,
        lambda_: float,
        delta: float = DEFAULT_DELTA,
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        super().__init__()
        _check_settings(encoder, k, lambda_, delta, margin)
        self.encoder = encoder
        self.k, self.lambda_, self.delta, self.margin = k, float(lambda_), float(delta), float(margin)

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> LossTerms:
        return cascade_loss(anchor, positive, negative, self.encoder, self.k, self.lambda_,
                            self.delta, self.margin)

    def extra_repr(self) -> str:
        return f"k={self.k}, lambda_={self.lambda_}, delta={self.delta}, margin={self.margin}"


def _check_settings(encoder: nn.Module | None, k: int, lambda_: float, delta: float,
                    margin: float) -> None:
    """ValueError naming the first out-of-range setting."""
    _check_k(k)
    if isinstance(lambda_, bool) or not (math.isfinite(lambda_) and 0.0 <= lambda_ <= 1.0):
        raise ValueError(f"lambda_={lambda_!r} is out of range; expected a number in [0, 1]")
    _check_nonnegative("delta", delta)
    _check_nonnegative("margin", margin)
    if encoder is None and (delta > 0 or lambda_ < 1):
        raise ValueError(
            f"an encoder is needed for lambda_={lambda_!r}, delta={delta!r}; "
            "only lambda_=1 with delta=0 runs without one"
        )


def _check_k(k: int) -> None:
    if isinstance(k, bool) or k not in (1, 2):
        raise ValueError(f"k={k!r} is not supported; expected 1 (mean absolute error) or 2 (mean squared error)")


def _check_nonnegative(name: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} is out of range; expected a finite number >= 0")
