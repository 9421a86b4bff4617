"""cascade.losses: known values, the paper's formula, gradient routing and skipped work."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cascade.config as config
from cascade.losses import (
    DEFAULT_DELTA,
    DEFAULT_MARGIN,
    DEFAULT_REDUCTION,
    REDUCTIONS,
    CascadeLoss,
    DistanceStats,
    LossTerms,
    cascade_loss,
    feature_distance,
    l_perceptual,
    l_reg,
    l_triplet,
)

SCALARS = ("total", "reg", "perceptual", "triplet")  # the 0-dim fields of LossTerms


class RecordingEncoder(nn.Module):
    """A tiny frozen conv encoder `(B, 3, H, W) -> (B, 8)` that records each call."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights in every instance, global RNG untouched
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.requires_grad_(False)
        self.calls: list[tuple[int, bool]] = []  # (batch size, grad enabled)

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def images(seed: int, b: int = 2, s: int = 8) -> Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def triple() -> tuple[Tensor, Tensor, Tensor]:
    return images(1).requires_grad_(True), images(2), images(3)


# -- the single terms ---------------------------------------------------------------------------

@pytest.mark.parametrize("k, expected", [(1, 0.4375), (2, 0.328125)])
def test_l_reg_known_values(k: int, expected: float) -> None:
    anchor = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 2, 2)
    assert l_reg(anchor, torch.zeros_like(anchor), k).item() == pytest.approx(expected)


@pytest.mark.parametrize("k", [0, 3, 1.5, True])
def test_l_reg_rejects_other_norms(k: object) -> None:
    with pytest.raises(ValueError, match=rf"k={k!r} is not supported; expected 1 .* or 2"):
        l_reg(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), k)  # type: ignore[arg-type]


def test_l_perceptual_is_mse_over_embedding() -> None:
    fa, fp = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert l_perceptual(fa, fp).item() == pytest.approx((1 + 4) / 4)


def test_triplet_zero_when_negative_far() -> None:
    fa, fp, fn = torch.zeros(3, 4), torch.full((3, 4), 0.1), torch.full((3, 4), 5.0)
    assert l_triplet(fa, fp, fn, margin=0.5).item() == 0.0


def test_triplet_known_value_with_hinge_per_sample() -> None:
    # Sample 0: d(a,p) = 1, d(a,n) = 0.25 -> 1 - 0.25 + 0.1 = 0.85. Sample 1: far negative -> 0.
    # The hinge applies per sample before the batch mean: (0.85 + 0) / 2.
    fa = torch.zeros(2, 2)
    fp = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    fn = torch.tensor([[0.5, 0.5], [3.0, 3.0]])
    assert l_triplet(fa, fp, fn, margin=0.1).item() == pytest.approx(0.425)


def test_triplet_gradient_flows_only_into_anchor() -> None:
    anchor, positive, negative = images(1), images(2), images(3).requires_grad_(True)
    anchor.requires_grad_(True)
    encoder = RecordingEncoder()
    terms = cascade_loss(anchor, positive, negative, encoder, k=2, lambda_=0.0, delta=0.0)
    assert terms.triplet.item() > 0
    terms.total.backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert negative.grad is None
    assert all(p.grad is None for p in encoder.parameters())


def test_default_margin_is_the_documented_one() -> None:
    assert DEFAULT_MARGIN == 0.1 and DEFAULT_DELTA == 1e-3


# -- the combined loss --------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("lambda_", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("delta", [0.0, 1e-3, 0.5])
def test_cascade_loss_matches_the_paper_formula(k: int, lambda_: float, delta: float) -> None:
    anchor, positive, negative = triple()
    encoder = RecordingEncoder()
    terms = cascade_loss(anchor, positive, negative, encoder, k, lambda_, delta, margin=0.3)
    assert isinstance(terms, LossTerms)
    fa, fp, fn = encoder(anchor), encoder(positive), encoder(negative)
    reg, pl, trip = l_reg(anchor, positive, k), l_perceptual(fa, fp), l_triplet(fa, fp, fn, 0.3)
    expected = lambda_ * reg + delta * pl + (1 - lambda_) * trip
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    # A term is computed exactly when its weight is non-zero, else it reads 0.
    assert terms.reg.item() == pytest.approx(reg.item() if lambda_ > 0 else 0.0, rel=1e-6)
    assert terms.perceptual.item() == pytest.approx(pl.item() if delta > 0 else 0.0, rel=1e-5)
    assert terms.triplet.item() == pytest.approx(trip.item() if lambda_ < 1 else 0.0, rel=1e-5)


def test_lambda_one_leaves_no_triplet_and_skips_the_negative() -> None:
    anchor, positive, negative = triple()
    encoder = RecordingEncoder()
    terms = cascade_loss(anchor, positive, negative, encoder, k=2, lambda_=1.0, delta=0.5)
    assert terms.triplet.item() == 0.0
    assert terms.total.item() == pytest.approx((terms.reg + 0.5 * terms.perceptual).item())
    # f(positive) alone without gradients, f(anchor) with: f(negative) never computed.
    assert encoder.calls == [(2, False), (2, True)]


def test_lambda_one_delta_zero_needs_no_encoder() -> None:
    anchor, positive, negative = triple()
    terms = cascade_loss(anchor, positive, negative, None, k=1, lambda_=1.0, delta=0.0)
    assert terms.total.item() == pytest.approx(l_reg(anchor, positive, 1).item())
    encoder = RecordingEncoder()
    cascade_loss(anchor, positive, negative, encoder, k=1, lambda_=1.0, delta=0.0)
    assert encoder.calls == []


def test_lambda_zero_leaves_no_regularisation_term() -> None:
    anchor, positive, negative = triple()
    encoder = RecordingEncoder()
    terms = cascade_loss(anchor, positive, negative, encoder, k=2, lambda_=0.0, delta=0.1)
    assert terms.reg.item() == 0.0
    assert terms.total.item() == pytest.approx((0.1 * terms.perceptual + terms.triplet).item())
    # The anchor's gradient is that of the perceptual and triplet terms alone.
    (grad,) = torch.autograd.grad(terms.total, anchor)
    fa = encoder(anchor)
    with torch.no_grad():
        fp, fn = encoder(positive), encoder(negative)
    (expected,) = torch.autograd.grad(0.1 * l_perceptual(fa, fp) + l_triplet(fa, fp, fn), anchor)
    torch.testing.assert_close(grad, expected)


def test_positive_and_negative_share_one_no_grad_pass() -> None:
    anchor, positive, negative = triple()
    encoder = RecordingEncoder()
    cascade_loss(anchor, positive, negative.requires_grad_(True), encoder, k=2, lambda_=0.6)
    assert encoder.calls == [(4, False), (2, True)]


def test_gradients_reach_the_anchor_only() -> None:
    anchor = images(1).requires_grad_(True)
    positive, negative = images(2).requires_grad_(True), images(3).requires_grad_(True)
    encoder = RecordingEncoder()
    terms = cascade_loss(anchor, positive, negative, encoder, k=1, lambda_=0.6, delta=1e-3)
    terms.total.backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert positive.grad is None and negative.grad is None
    assert encoder.conv.weight.grad is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lambda_": 1.5}, r"lambda_=1\.5 is out of range; expected a number in \[0, 1\]"),
        ({"lambda_": -0.1}, r"lambda_=-0\.1 is out of range"),
        ({"lambda_": math.nan}, r"lambda_=nan is out of range"),
        ({"delta": -1e-3}, r"delta=-0\.001 is out of range; expected a finite number >= 0"),
        ({"margin": -0.2}, r"margin=-0\.2 is out of range"),
        ({"k": 3}, r"k=3 is not supported"),
        ({"reduction": "max"}, r"reduction='max' is not supported; expected one of mean, sum"),
    ],
)
def test_bad_settings_name_the_value(kwargs: dict, message: str) -> None:
    settings = {"k": 2, "lambda_": 0.6, "delta": 1e-3, "margin": 0.1, **kwargs}
    anchor, positive, negative = triple()
    with pytest.raises(ValueError, match=message):
        cascade_loss(anchor, positive, negative, RecordingEncoder(), **settings)
    with pytest.raises(ValueError, match=message):
        CascadeLoss(RecordingEncoder(), **settings)


def test_missing_encoder_and_shape_mismatch_are_errors() -> None:
    anchor, positive, negative = triple()
    with pytest.raises(ValueError, match=r"an encoder is needed for lambda_=0\.6, delta=0\.001"):
        cascade_loss(anchor, positive, negative, None, k=2, lambda_=0.6)
    with pytest.raises(ValueError, match=r"share one \(B, 3, H, W\) shape"):
        cascade_loss(anchor, positive, negative[:1], RecordingEncoder(), k=2, lambda_=0.6)


def test_module_equals_function_and_moves_its_encoder() -> None:
    anchor, positive, negative = triple()
    loss = CascadeLoss(RecordingEncoder(), k=2, lambda_=0.6, delta=0.01, margin=0.2)
    got = loss(anchor, positive, negative)
    want = cascade_loss(anchor, positive, negative, RecordingEncoder(), 2, 0.6, 0.01, 0.2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert "encoder.conv.weight" in dict(loss.named_parameters())
    assert "lambda_=0.6" in repr(loss) and "reduction='mean'" in repr(loss)


def test_terms_are_float32_under_low_precision_inputs() -> None:
    anchor, positive, negative = (t.detach().bfloat16() for t in triple())
    terms = cascade_loss(anchor, positive, negative, None, k=2, lambda_=1.0, delta=0.0)
    assert terms.total.dtype == torch.float32 and terms.reg.dtype == torch.float32


# -- reduction: mean | sum ----------------------------------------------------------------------

def reg_pair(b: int = 1) -> tuple[Tensor, Tensor]:
    """A 1x3x2x2 anchor (then all-zero samples up to `b`) against an all-zero positive."""
    first = torch.tensor([[[0.0, 0.5], [1.0, 0.25]],  # |.| sums to 1.75, squares to 1.3125
                          [[0.5, 0.5], [0.5, 0.5]],  # 2.0, 1.0
                          [[0.0, 0.0], [0.0, 0.0]]])  # 0, 0
    anchor = torch.cat([first[None], torch.zeros(b - 1, 3, 2, 2)])
    return anchor, torch.zeros_like(anchor)


@pytest.mark.parametrize(
    "k, reduction, b, expected",
    [
        (1, "mean", 1, 3.75 / 12), (2, "mean", 1, 2.3125 / 12),
        (1, "sum", 1, 3.75), (2, "sum", 1, 2.3125),
        # A second, all-zero sample: `mean` divides by 24 elements, `sum` averages two sums.
        (1, "mean", 2, 3.75 / 24), (1, "sum", 2, 3.75 / 2), (2, "sum", 2, 2.3125 / 2),
    ],
)
def test_l_reg_known_values_per_reduction(k: int, reduction: str, b: int, expected: float) -> None:
    anchor, positive = reg_pair(b)
    assert l_reg(anchor, positive, k, reduction).item() == pytest.approx(expected, rel=1e-7)


def embeddings() -> tuple[Tensor, Tensor, Tensor]:
    """4-d embeddings of a batch of 2: d(a,p) = [2, 0], d(a,n) = [1, 4], d(p,n) = [1, 4] as sums
    (as means over the 4 elements: [0.5, 0], [0.25, 1], [0.25, 1])."""
    fa = torch.zeros(2, 4)
    fp = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    fn = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    return fa, fp, fn


@pytest.mark.parametrize(
    "reduction, d_ap, d_an, d_pn, perceptual, triplet",
    [
        # hinge with margin 0.5: sum [2 - 1 + .5, 0 - 4 + .5]_+ = [1.5, 0]; mean [.75, 0]
        ("sum", [2.0, 0.0], [1.0, 4.0], [1.0, 4.0], 1.0, 0.75),
        ("mean", [0.5, 0.0], [0.25, 1.0], [0.25, 1.0], 0.25, 0.375),
    ],
)
def test_distances_known_values_per_reduction(reduction: str, d_ap: list, d_an: list, d_pn: list,
                                              perceptual: float, triplet: float) -> None:
    fa, fp, fn = embeddings()
    assert feature_distance(fa, fp, reduction).tolist() == d_ap
    assert feature_distance(fa, fn, reduction).tolist() == d_an
    assert feature_distance(fp, fn, reduction).tolist() == d_pn
    assert l_perceptual(fa, fp, reduction).item() == pytest.approx(perceptual)
    assert l_triplet(fa, fp, fn, 0.5, reduction).item() == pytest.approx(triplet)


def test_mean_is_the_previous_definition_bit_for_bit() -> None:
    # The formulas this module used before `reduction` existed; `mean` must reproduce them exactly.
    anchor, positive, negative = triple()
    encoder = RecordingEncoder()
    terms = cascade_loss(anchor, positive, negative, encoder, k=1, lambda_=0.6, delta=0.01, margin=0.2)
    assert DEFAULT_REDUCTION == "mean"
    fa = encoder(anchor)
    with torch.no_grad():
        f = encoder(torch.cat([positive, negative]))
    fp, fn = f[:2], f[2:]
    reg = F.l1_loss(anchor, positive)
    pl = F.mse_loss(fa, fp)
    trip = F.relu((fa - fp).pow(2).mean(dim=1) - (fa - fn).pow(2).mean(dim=1) + 0.2).mean()
    total = 0.6 * reg + 0.01 * pl + (1.0 - 0.6) * trip
    for got, want in zip(terms[:4], (total, reg, pl, trip)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("k", [1, 2])
def test_sum_scales_each_term_by_its_element_count(k: int) -> None:
    # Same inputs: L_REG grows by 3*H*W = 192 pixels, L_PL by D = 8 (RecordingEncoder): the two
    # reductions weigh L_REG against the embedding terms 192/8 = 24x differently (48x for 128 px
    # crops and a 1024-d embedding).
    anchor, positive, negative = triple()
    mean = cascade_loss(anchor, positive, negative, RecordingEncoder(), k, 0.5, 0.1, 0.0, "mean")
    total = cascade_loss(anchor, positive, negative, RecordingEncoder(), k, 0.5, 0.1, 0.0, "sum")
    assert total.reg.item() == pytest.approx(192 * mean.reg.item(), rel=1e-5)
    assert total.perceptual.item() == pytest.approx(8 * mean.perceptual.item(), rel=1e-5)
    # With margin 0 the hinge is positively homogeneous: the triplet scales by D as well.
    assert total.triplet.item() == pytest.approx(8 * mean.triplet.item(), rel=1e-5)
    torch.testing.assert_close(total.d_pn, 8 * mean.d_pn)


@pytest.mark.parametrize("lambda_", [0.0, 0.4, 1.0])
def test_cascade_loss_with_sum_matches_the_formula(lambda_: float) -> None:
    anchor, positive, negative = triple()
    encoder = RecordingEncoder()
    loss = CascadeLoss(RecordingEncoder(), 2, lambda_, 0.5, 0.3, reduction="sum")
    terms = loss(anchor, positive, negative)
    fa, fp, fn = encoder(anchor), encoder(positive), encoder(negative)
    reg = (anchor - positive).pow(2).sum(dim=(1, 2, 3)).mean()
    pl = (fa - fp).pow(2).sum(dim=1).mean()
    trip = F.relu((fa - fp).pow(2).sum(1) - (fa - fn).pow(2).sum(1) + 0.3).mean()
    expected = lambda_ * reg + 0.5 * pl + (1 - lambda_) * trip
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms.reg.item() == pytest.approx(reg.item() if lambda_ > 0 else 0.0, rel=1e-6)
    assert terms.triplet.item() == pytest.approx(trip.item() if lambda_ < 1 else 0.0, rel=1e-5)
    assert loss.reduction == "sum" and "reduction='sum'" in repr(loss)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_token_embeddings_reduce_over_every_element(reduction: str) -> None:
    # (B, N, D) tokens and their (B, N*D) flattening give the same distances; `mean` is the
    # mean over tokens of each token's MSE, `sum` the sum over tokens of each token's squared norm.
    g = torch.Generator().manual_seed(4)
    fa, fp, fn = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    per_token = (fa - fp).pow(2).mean(dim=2)  # (B, N)
    expected = per_token.mean(dim=1) if reduction == "mean" else 3 * per_token.sum(dim=1)
    torch.testing.assert_close(feature_distance(fa, fp, reduction), expected)
    flat = [t.flatten(1) for t in (fa, fp, fn)]
    assert l_triplet(fa, fp, fn, 0.5, reduction).item() == pytest.approx(
        l_triplet(*flat, margin=0.5, reduction=reduction).item())
    assert l_perceptual(fa, fp, reduction).item() == pytest.approx(
        l_perceptual(flat[0], flat[1], reduction).item())


def test_reductions_are_mirrored_in_config() -> None:
    # cascade.config validates `reduction` without importing torch, from its own tuple.
    assert config.REDUCTIONS == REDUCTIONS


# -- d(p, n) and the hinge, recorded ------------------------------------------------------------

class LinearEncoder(nn.Module):
    """f(x) = the image's 4 pixel values of channel 0 (2x2 images): distances by hand."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0].flatten(1)


def test_loss_terms_carry_d_pn_and_the_active_hinge() -> None:
    # Channel 0 of positive/negative/anchor is exactly the embedding of `embeddings()`.
    fa, fp, fn = embeddings()
    anchor, positive, negative = (f.view(2, 1, 2, 2).repeat(1, 3, 1, 1) for f in (fa, fp, fn))
    anchor.requires_grad_(True)
    terms = cascade_loss(anchor, positive, negative, LinearEncoder(), k=2, lambda_=0.5,
                         delta=0.0, margin=0.5, reduction="sum")
    assert terms.d_pn.tolist() == [1.0, 4.0] and terms.d_pn.dtype == torch.float32
    assert terms.hinge_active.tolist() == [True, False]  # hinge arguments 1.5 and -3.5
    assert not terms.d_pn.requires_grad and not terms.hinge_active.requires_grad
    assert terms.triplet.item() == pytest.approx(0.75)


def test_no_triplet_means_empty_distances() -> None:
    anchor, positive, negative = triple()
    for encoder, delta in ((None, 0.0), (RecordingEncoder(), 0.5)):
        terms = cascade_loss(anchor, positive, negative, encoder, k=2, lambda_=1.0, delta=delta)
        assert terms.d_pn.shape == (0,) and terms.hinge_active.shape == (0,)
        assert terms.hinge_active.dtype == torch.bool


def filled_stats() -> DistanceStats:
    stats = DistanceStats()
    stats.update(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([1, 0, 0, 1, 0]).bool())
    stats.update(torch.zeros(0), torch.zeros(0, dtype=torch.bool))  # a lambda_ = 1 step: nothing
    stats.update(torch.tensor([6.0, 7.0, 8.0, 9.0, 10.0]), torch.tensor([0, 0, 1, 0, 0]).bool())
    return stats


def test_distance_stats_known_values() -> None:
    got = filled_stats().to_dict()
    # 1..10: linear-interpolated quantiles at positions 0.45, 4.5 and 8.55 (0-based).
    want = {"count": 10, "mean": 5.5, "std": math.sqrt(8.25), "min": 1.0, "max": 10.0,
            "p5": 1.45, "p50": 5.5, "p95": 9.55, "hinge_active": 0.3}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert len(filled_stats()) == 10


def test_distance_stats_empty_and_round_trip() -> None:
    empty = DistanceStats().to_dict()
    assert empty["count"] == 0 and all(v is None for k, v in empty.items() if k != "count")
    restored = DistanceStats()
    restored.load_state_dict(filled_stats().state_dict())
    assert restored.to_dict() == filled_stats().to_dict()
    both = filled_stats()
    both.extend(restored)
    assert both.to_dict()["count"] == 20 and both.to_dict()["mean"] == pytest.approx(5.5)
    assert both.values()[0].tolist() == [*range(1, 11)] * 2
    with pytest.raises(ValueError, match=r"must be two \(B,\) tensors"):
        DistanceStats().update(torch.zeros(2), torch.zeros(3, dtype=torch.bool))


def test_distance_stats_fed_from_the_loss() -> None:
    stats = DistanceStats()
    anchor, positive, negative = triple()
    for _ in range(3):
        terms = cascade_loss(anchor, positive, negative, RecordingEncoder(), k=2, lambda_=0.6)
        stats.update(terms.d_pn, terms.hinge_active)
    d, active = stats.values()
    assert d.tolist() == pytest.approx(terms.d_pn.tolist() * 3)
    assert stats.to_dict()["hinge_active"] == terms.hinge_active.double().mean().item()


def test_distance_stats_gathered_over_ranks() -> None:
    # Two ranks as threads, each with its own samples (of different counts) and a summing
    # all_reduce; both get every sample, rank 0's first.
    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce_for(rank: int):
        def all_reduce(t: Tensor) -> Tensor:
            slots[rank] = t
            barrier.wait()
            out = slots[0] + slots[1]
            barrier.wait()
            return out
        return all_reduce

    mine = [DistanceStats(), DistanceStats()]
    mine[0].update(torch.tensor([1.0, 2.0]), torch.tensor([True, False]))
    mine[1].update(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([False, False, True]))
    results: list = [None, None]
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(
        r, mine[r].gathered(all_reduce_for(r), r, 2))) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for result in results:
        d, active = result.values()
        assert d.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert active.tolist() == [True, False, False, False, True]


# -- precision under bf16 autocast ---------------------------------------------------------------

class DtypeRecordingEncoder(RecordingEncoder):
    """RecordingEncoder that also records the dtype its convolution computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        self.dtypes.append(y.dtype)
        return torch.tanh(y).mean(dim=(2, 3))


def test_bf16_autocast_runs_the_encoder_in_bf16_and_the_terms_in_fp32() -> None:
    # The stated rule: the encoder under the caller's autocast; its outputs cast to float32;
    # every difference, reduction and the hinge in float32.
    anchor, positive, negative = triple()
    encoder = DtypeRecordingEncoder()
    with torch.autocast("cpu", torch.bfloat16):
        terms = cascade_loss(anchor, positive, negative, encoder, k=2, lambda_=0.4, delta=0.5,
                             margin=0.3)
        f = encoder(torch.cat([positive, negative]))  # the rule, spelled out
        fa = encoder(anchor)
    assert encoder.dtypes == [torch.bfloat16] * 4  # the loss's two passes, then ours
    assert all(t.dtype == torch.float32 for t in terms[:4]) and terms.d_pn.dtype == torch.float32
    fa, fp, fn = fa.float(), f[:2].float(), f[2:].float()
    reg = F.mse_loss(anchor, positive)
    pl = (fa - fp).pow(2).mean()
    trip = F.relu((fa - fp).pow(2).mean(1) - (fa - fn).pow(2).mean(1) + 0.3).mean()
    torch.testing.assert_close(terms.reg, reg, rtol=0, atol=0)
    torch.testing.assert_close(terms.perceptual, pl, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.triplet, trip, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.total, 0.4 * reg + 0.5 * pl + 0.6 * trip, rtol=1e-6, atol=0)
    # Not what bf16 arithmetic on the same embeddings gives (the triplet rounds visibly) ...
    bf = [t.bfloat16() for t in (fa, fp, fn)]
    trip_bf16 = F.relu((bf[0] - bf[1]).pow(2).mean(1) - (bf[0] - bf[2]).pow(2).mean(1) + 0.3).mean()
    assert abs(trip_bf16.item() - terms.triplet.item()) > 1e-4
    # ... and not an fp32 encoder either: the bf16 encoder moved L_PL, by well under 5 %.
    fp32 = cascade_loss(anchor, positive, negative, RecordingEncoder(), k=2, lambda_=0.4,
                        delta=0.5, margin=0.3)
    assert fp32.perceptual.item() != terms.perceptual.item()
    assert terms.perceptual.item() == pytest.approx(fp32.perceptual.item(), rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    anchor, positive, negative = triple()
    cpu = cascade_loss(anchor, positive, negative, RecordingEncoder(), k=2, lambda_=0.6, delta=0.1)
    dev = torch.device("cuda")
    a = anchor.detach().to(dev).requires_grad_(True)
    gpu = cascade_loss(a, positive.to(dev), negative.to(dev), RecordingEncoder().to(dev), k=2,
                       lambda_=0.6, delta=0.1)
    gpu.total.backward()
    assert a.grad is not None and a.grad.device.type == "cuda"
    for x, y in zip(cpu, gpu):
        assert x.item() == pytest.approx(y.item(), rel=1e-4, abs=1e-6)
