"""cascade.losses: known values, the paper's formula, gradient routing and skipped work."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from cascade.losses import (
    DEFAULT_DELTA,
    DEFAULT_MARGIN,
    CascadeLoss,
    LossTerms,
    cascade_loss,
    l_perceptual,
    l_reg,
    l_triplet,
)


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
        assert a.item() == pytest.approx(b.item())
    assert "encoder.conv.weight" in dict(loss.named_parameters())
    assert "lambda_=0.6" in repr(loss)


def test_terms_are_float32_under_low_precision_inputs() -> None:
    anchor, positive, negative = (t.detach().bfloat16() for t in triple())
    terms = cascade_loss(anchor, positive, negative, None, k=2, lambda_=1.0, delta=0.0)
    assert terms.total.dtype == torch.float32 and terms.reg.dtype == torch.float32


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
