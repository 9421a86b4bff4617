"""Losses of the cascaded fine-tuning paper (Song & Bae).

The anchor network is fine-tuned with

    L = lambda_ * L_REG(k) + delta * L_PL + (1 - lambda_) * L_triplet(margin)

where, with f a frozen perceptual encoder (`cascade.encoders`) and d(x, y) = ||f(x) - f(y)||^2:

- L_REG = ||anchor - positive||_k^k (k=1: absolute, k=2: squared differences);
- L_PL = d(anchor, positive);
- L_triplet = [d(anchor, positive) - d(anchor, negative) + margin]_+, the hinge taken per sample.

The paper calls ||.||_2^2 an "L2-distance calculated by MSE" (eq. 1) but does not say over what
the norms are taken, so `reduction` makes it a named choice (`REDUCTIONS`):

- `mean` (the default; what this module always did): every norm is a mean over its elements:
  L_REG over the B*3*H*W pixels, d over the D embedding elements of a sample, L_PL and L_triplet
  over the batch. At 128 px crops and a 1024-d embedding this weighs L_REG 48x more, relative to
  L_PL and L_triplet, than `sum` does (3*128*128 / 1024 = 48).
- `sum`: every norm is a plain sum over one sample's elements (L_REG over its 3*H*W pixels, d
  over its D embedding elements), the literal ||.||_k^k of one image; the per-sample values are
  then *averaged* over the batch. Averaging, not summing, over the batch keeps the loss, and so
  the learning rate, independent of the batch size and of the number of data-parallel workers
  (each rank averages its shard, gradients are averaged over ranks: the mean over the global
  batch), and it is the usual reading of a per-image loss in a minibatch objective.

`margin` is in the units of d under the chosen reduction (an MSE for `mean`, a squared L2 norm
for `sum`, D or N*D times larger for the same embeddings); it is never rescaled here.
An encoder's embedding may be any `(B, ...)` tensor (e.g. patch tokens `(B, N*D)` or
`(B, N, D)`): d reduces over all of one sample's elements, so `mean` is the mean over tokens of
each token's MSE and `sum` the sum over tokens.

Precision: the encoder runs under whatever autocast the caller set (`precision: bf16` in the
trainer), since it is most of the step's FLOPs; its outputs are cast to float32 and every
difference, reduction and the hinge are then computed in float32 with autocast switched off,
since L_PL and the triplet are small differences of MSEs, which bf16's 8-bit mantissa would round
away. All returned terms are float32.

`anchor` is the second (fine-tuned) network's output, `positive` the ground truth and `negative`
the first network's output (the hard negative: the same scene with flare left in it). All images
are `(B, 3, H, W)` in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The default weights are defined (and their choice explained) in cascade.config, which must import
# without torch; they are re-exported here, beside the loss they parametrise.
from cascade.config import DEFAULT_DELTA, DEFAULT_MARGIN

REDUCTIONS = ("mean", "sum")
"""How every norm of the loss reduces over a sample's elements (see the module docstring)."""
DEFAULT_REDUCTION = "mean"


class LossTerms(NamedTuple):
    """One evaluation of the cascade loss.

    `total`, `reg`, `perceptual`, `triplet`: 0-dim float32 tensors. `reg`, `perceptual` and
    `triplet` are the unweighted terms; `total` is their weighted sum (the only one carrying
    gradients that should be back-propagated). A term whose weight is 0 is not computed and reads
    exactly 0.
    `d_pn`: `(B,)` float32, detached: d(positive, negative) = ||f(p) - f(n)||^2 per sample, in the
    units of the margin. `hinge_active`: `(B,)` bool, detached: d(a, p) - d(a, n) + margin > 0,
    the samples whose triplet term is non-zero (and has a gradient). Both are empty `(0,)` when
    the triplet term is not computed (lambda_ == 1). Feed them to `DistanceStats`.
    """

    total: Tensor
    reg: Tensor
    perceptual: Tensor
    triplet: Tensor
    d_pn: Tensor
    hinge_active: Tensor


def l_reg(anchor: Tensor, positive: Tensor, k: int, reduction: str = DEFAULT_REDUCTION) -> Tensor:
    """The paper's ||anchor - positive||_k^k (0-dim tensor).

    anchor, positive: `(B, C, H, W)` in [0, 1]. `mean`: over all B*C*H*W elements (k=1: mean
    absolute error, k=2: mean squared error); `sum`: summed over each sample's C*H*W elements,
    averaged over the batch.
    """
    _check_k(k)
    _check_reduction(reduction)
    if anchor.shape != positive.shape:
        raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} differ in shape")
    if reduction == "mean":
        return F.l1_loss(anchor, positive) if k == 1 else F.mse_loss(anchor, positive)
    diff = anchor - positive
    per_sample = (diff.abs() if k == 1 else diff.pow(2)).flatten(1).sum(dim=1)  # (B,)
    return per_sample.mean()


def feature_distance(x: Tensor, y: Tensor, reduction: str = DEFAULT_REDUCTION) -> Tensor:
    """d(x, y) = ||x - y||^2 per sample, `(B,)`: over all of a sample's elements.

    x, y: embeddings `(B, ...)` of one shape (`(B, D)`, `(B, N*D)` or `(B, N, D)`). `mean`: the
    MSE over a sample's elements; `sum`: the squared L2 norm of their difference.
    """
    _check_reduction(reduction)
    sq = (x - y).pow(2).flatten(1)  # (B, elements of one sample)
    return sq.mean(dim=1) if reduction == "mean" else sq.sum(dim=1)


def l_perceptual(fa: Tensor, fp: Tensor, reduction: str = DEFAULT_REDUCTION) -> Tensor:
    """Batch mean of d(fa, fp); embeddings `(B, ...)`. `mean` is one MSE over batch and elements."""
    _check_reduction(reduction)
    if reduction == "mean":
        return F.mse_loss(fa, fp)  # equal sizes per sample: the batch mean of per-sample MSEs
    return feature_distance(fa, fp, reduction).mean()


def l_triplet(fa: Tensor, fp: Tensor, fn: Tensor, margin: float = DEFAULT_MARGIN,
              reduction: str = DEFAULT_REDUCTION) -> Tensor:
    """Mean over the batch of [d(fa, fp) - d(fa, fn) + margin]_+ (see `feature_distance`).

    fa, fp, fn: embeddings `(B, ...)` of anchor, positive and negative; margin >= 0 (see
    DEFAULT_MARGIN), in the units of d under `reduction`. Returns a 0-dim tensor >= 0.
    """
    return _triplet(fa, fp, fn, margin, reduction)[0]


def _triplet(fa: Tensor, fp: Tensor, fn: Tensor, margin: float, reduction: str
             ) -> tuple[Tensor, Tensor]:
    """(L_triplet 0-dim, hinge argument `(B,)`)."""
    _check_nonnegative("margin", margin)
    d_pos = feature_distance(fa, fp, reduction)  # (B,)
    d_neg = feature_distance(fa, fn, reduction)  # (B,)
    hinge = d_pos - d_neg + margin  # (B,)
    return F.relu(hinge).mean(), hinge


def cascade_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    encoder: nn.Module | None,
    k: int,
    lambda_: float,
    delta: float = DEFAULT_DELTA,
    margin: float = DEFAULT_MARGIN,
    reduction: str = DEFAULT_REDUCTION,
    targets: Tensor | None = None,
) -> LossTerms:
    """lambda_ * L_REG(k) + delta * L_PL + (1 - lambda_) * L_triplet(margin), with each term.

    anchor, positive, negative: `(B, 3, H, W)` in [0, 1]; only `anchor` needs gradients.
    encoder: frozen module `(B, 3, H, W) -> (B, ...)` (a `cascade.encoders.PerceptualEncoder`);
    it may be None when lambda_ == 1 and delta == 0, the one setting where no term needs it.
    k in {1, 2}, lambda_ in [0, 1], delta >= 0, margin >= 0, reduction in REDUCTIONS; otherwise
    ValueError naming the value.

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

    Precision: the encoder calls run under the caller's autocast (bf16 matmuls when the trainer
    sets `precision: bf16`); everything after them, L_REG included, runs in float32 with autocast
    off. The terms are float32 whatever the input dtypes.

    `targets`: `target_features(encoder, positive, negative, lambda_, delta)` computed beforehand
    (the stream cache, `cascade.stream_cache`, stores it): the no-grad pass is then skipped, and
    the terms are bit-identical to computing it here, since this function computes exactly that.
    """
    _check_settings(encoder, k, lambda_, delta, margin, reduction)
    if not (anchor.shape == positive.shape == negative.shape) or anchor.dim() != 4:
        raise ValueError(
            "anchor, positive and negative must share one (B, 3, H, W) shape; got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )

    need_triplet = lambda_ < 1
    f_targets = fa = None
    if delta > 0 or need_triplet:
        assert encoder is not None  # _check_settings guarantees it
        if targets is None:
            f_targets = target_features(encoder, positive, negative, lambda_, delta)
        else:
            rows = 2 * anchor.shape[0] if need_triplet else anchor.shape[0]
            if targets.dim() < 2 or targets.shape[0] != rows:
                raise ValueError(f"targets {tuple(targets.shape)}: expected {rows} rows of "
                                 f"embeddings (f(p){' and f(n)' if need_triplet else ''})")
            f_targets = targets.detach()
        fa = encoder(anchor)  # (B, ...), with a graph back to the anchor

    b = anchor.shape[0]
    with _float32(anchor):
        zero = anchor.new_zeros((), dtype=torch.float32)
        empty = anchor.new_zeros((0,), dtype=torch.float32)
        # positive and negative are targets: no gradient reaches them, only the anchor.
        reg = l_reg(anchor.float(), positive.detach().float(), k, reduction) if lambda_ > 0 else zero
        total = lambda_ * reg if lambda_ > 0 else zero
        perceptual = triplet = zero
        d_pn, hinge_active = empty, empty.bool()
        if fa is not None and f_targets is not None:
            fa, f_targets = fa.float(), f_targets.float()
            fp = f_targets[:b]
            if delta > 0:
                perceptual = l_perceptual(fa, fp, reduction)
                total = total + delta * perceptual
            if need_triplet:
                fn = f_targets[b:]
                triplet, hinge = _triplet(fa, fp, fn, margin, reduction)
                total = total + (1.0 - lambda_) * triplet
                d_pn = feature_distance(fp, fn, reduction).detach()  # (B,): targets only
                hinge_active = (hinge > 0).detach()
    return LossTerms(total=total, reg=reg, perceptual=perceptual, triplet=triplet, d_pn=d_pn,
                     hinge_active=hinge_active)


TARGET_KINDS = ("pn", "p")
"""Which target embeddings a loss needs (`target_kind`): f(p) and f(n) in one batched pass, or f(p)."""


def target_kind(lambda_: float, delta: float) -> str | None:
    """"pn" (the triplet: lambda_ < 1), "p" (L_PL only: lambda_ == 1, delta > 0) or None (no
    encoder term: lambda_ == 1, delta == 0): which rows `target_features` computes."""
    if lambda_ < 1:
        return "pn"
    return "p" if delta > 0 else None


def target_features(encoder: nn.Module | None, positive: Tensor, negative: Tensor, lambda_: float,
                    delta: float) -> Tensor | None:
    """The loss's target embeddings, as `cascade_loss` computes them: `(2B, ...)` = f(p) rows then
    f(n) rows, in one batched no-grad pass (`target_kind` "pn"); `(B, ...)` f(p) ("p"); None when
    no term needs the encoder. positive, negative: `(B, 3, H, W)` in [0, 1]. Runs under the
    caller's autocast: the encoder is most of the step's FLOPs. The batch composition is part of
    the result's bits (kernels block by batch size), so a cache must store exactly this."""
    kind = target_kind(lambda_, delta)
    if kind is None:
        return None
    if encoder is None:
        raise ValueError(f"an encoder is needed for lambda_={lambda_!r}, delta={delta!r}")
    targets = torch.cat([positive, negative]) if kind == "pn" else positive
    with torch.no_grad():
        return encoder(targets)  # (B or 2B, ...)


def _float32(like: Tensor) -> AbstractContextManager:
    """Autocast switched off on `like`'s device type: float32 tensors stay float32."""
    return torch.autocast(like.device.type, enabled=False)


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
        reduction: str = DEFAULT_REDUCTION,
    ) -> None:
        super().__init__()
        _check_settings(encoder, k, lambda_, delta, margin, reduction)
        self.encoder = encoder
        self.k, self.lambda_, self.delta, self.margin = k, float(lambda_), float(delta), float(margin)
        self.reduction = reduction

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor,
                targets: Tensor | None = None) -> LossTerms:
        """`targets`: `self.targets(positive, negative)` computed beforehand (or None)."""
        return cascade_loss(anchor, positive, negative, self.encoder, self.k, self.lambda_,
                            self.delta, self.margin, self.reduction, targets)

    def targets(self, positive: Tensor, negative: Tensor) -> Tensor | None:
        """`target_features` with this loss's encoder and weights."""
        return target_features(self.encoder, positive, negative, self.lambda_, self.delta)

    def extra_repr(self) -> str:
        return (f"k={self.k}, lambda_={self.lambda_}, delta={self.delta}, margin={self.margin}, "
                f"reduction={self.reduction!r}")


# -- the measured d(p, n) ------------------------------------------------------------------------

class DistanceStats:
    """Distribution of d(p, n) = ||f(p) - f(n)||^2 over training, and how often the hinge was on.

    The margin only lets the triplet vanish at a = p if it is below d(p, n) (a = p gives
    [0 - d(p, n) + margin]_+), so the trainer records what d(p, n) actually was. Values are kept
    exactly (the paper's run is 1000 steps x 8 samples): `update` appends the step's detached
    device tensors without a host sync; `to_dict` copies them once.
    """

    QUANTILES = {"p5": 0.05, "p50": 0.5, "p95": 0.95}

    def __init__(self) -> None:
        self._d: list[Tensor] = []  # (B,) float per step
        self._active: list[Tensor] = []  # (B,) bool per step

    def update(self, d_pn: Tensor, hinge_active: Tensor) -> None:
        """Add one step's `LossTerms.d_pn` and `.hinge_active` (both `(B,)`; empty adds nothing)."""
        if d_pn.shape != hinge_active.shape or d_pn.dim() != 1:
            raise ValueError(f"d_pn {tuple(d_pn.shape)} and hinge_active "
                             f"{tuple(hinge_active.shape)} must be two (B,) tensors")
        if d_pn.numel():
            self._d.append(d_pn.detach())
            self._active.append(hinge_active.detach().bool())

    def extend(self, other: DistanceStats) -> None:
        """Append all of `other`'s samples (e.g. a resumed run's history before this run's)."""
        self.update(*other.values())

    def values(self) -> tuple[Tensor, Tensor]:
        """All samples so far on the CPU: d_pn `(n,)` float64 and hinge_active `(n,)` bool."""
        if not self._d:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        # Compacted into one CPU tensor each, so a later call copies only what came since.
        self._d = [torch.cat([d.to("cpu", torch.float64) for d in self._d])]
        self._active = [torch.cat([a.to("cpu") for a in self._active])]
        return self._d[0], self._active[0]

    def __len__(self) -> int:
        return sum(d.numel() for d in self._d)

    def to_dict(self) -> dict[str, float | int | None]:
        """`count`, `mean`, `std` (population, ddof=0), `min`, `max`, `p5`, `p50`, `p95` (linear
        interpolation, as numpy's default) of d(p, n), and `hinge_active` (fraction of samples);
        all None but `count` when nothing was recorded."""
        d, active = self.values()
        if not d.numel():
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None,
                    **{key: None for key in self.QUANTILES}, "hinge_active": None}
        q = torch.quantile(d, torch.tensor(list(self.QUANTILES.values()), dtype=torch.float64))
        return {"count": int(d.numel()), "mean": d.mean().item(),
                "std": d.std(correction=0).item(), "min": d.min().item(), "max": d.max().item(),
                **{key: v for key, v in zip(self.QUANTILES, q.tolist())},
                "hinge_active": active.double().mean().item()}

    def state_dict(self) -> dict[str, list]:
        """Plain lists, for a training checkpoint's `extra` (a resumed run keeps its history)."""
        d, active = self.values()
        return {"d_pn": d.tolist(), "hinge_active": active.tolist()}

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Replace the contents with `state_dict()`'s."""
        self._d, self._active = [], []
        self.update(torch.tensor(state["d_pn"], dtype=torch.float64),
                    torch.tensor(state["hinge_active"], dtype=torch.bool))

    def gathered(self, all_reduce: Callable[[Tensor], Tensor], rank: int, world_size: int,
                 device: torch.device | str = "cpu") -> DistanceStats:
        """The samples of every data-parallel rank, in rank order (a collective: all ranks call it).

        all_reduce: a sum over ranks (`DataParallel.all_reduce`); ranks may hold different counts.
        """
        d, active = self.values()
        counts = torch.zeros(world_size, dtype=torch.float64, device=device)
        counts[rank] = d.numel()
        counts = all_reduce(counts).cpu()
        n_max = int(counts.max().item())
        buf = torch.zeros(world_size, n_max, 2, dtype=torch.float64, device=device)  # (W, n, [d, on])
        buf[rank, : d.numel(), 0] = d.to(device)
        buf[rank, : d.numel(), 1] = active.to(device, torch.float64)
        buf = all_reduce(buf).cpu()
        out = DistanceStats()
        for r in range(world_size):
            n = int(counts[r].item())
            out.update(buf[r, :n, 0], buf[r, :n, 1] > 0.5)
        return out


def _check_settings(encoder: nn.Module | None, k: int, lambda_: float, delta: float,
                    margin: float, reduction: str = DEFAULT_REDUCTION) -> None:
    """ValueError naming the first out-of-range setting."""
    _check_k(k)
    if isinstance(lambda_, bool) or not (math.isfinite(lambda_) and 0.0 <= lambda_ <= 1.0):
        raise ValueError(f"lambda_={lambda_!r} is out of range; expected a number in [0, 1]")
    _check_nonnegative("delta", delta)
    _check_nonnegative("margin", margin)
    _check_reduction(reduction)
    if encoder is None and (delta > 0 or lambda_ < 1):
        raise ValueError(
            f"an encoder is needed for lambda_={lambda_!r}, delta={delta!r}; "
            "only lambda_=1 with delta=0 runs without one"
        )


def _check_k(k: int) -> None:
    if isinstance(k, bool) or k not in (1, 2):
        raise ValueError(f"k={k!r} is not supported; expected 1 (absolute differences) or 2 (squared differences)")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of "
                         + ", ".join(REDUCTIONS))


def _check_nonnegative(name: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} is out of range; expected a finite number >= 0")
