"""ImportanceMeter: (w * dL/dw)^2 accumulated over batches."""

import pytest
import torch

from ctprune.pruning import ImportanceMeter, magnitude_importance


def test_mean_and_ema_over_batches_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64))
    grads = [torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(5)]
    mean, ema = ImportanceMeter({"l": w}), ImportanceMeter({"l": w}, decay=0.8)
    for grad in grads:
        w.grad = grad
        mean.update()
        ema.update()
    scores = [(w.detach() * grad).square().reshape(3, 2, 9) for grad in grads]
    assert torch.allclose(mean.importance()["l"].double(), sum(scores) / 5, rtol=1e-6)
    weights = [0.2 * 0.8 ** (4 - i) for i in range(5)]
    expected = sum(wt * s for wt, s in zip(weights, scores)) / sum(weights)  # bias-corrected EMA
    assert torch.allclose(ema.importance()["l"].double(), expected, rtol=1e-6)
    assert mean.batches == ema.batches == 5


def test_correction_layers_without_grad_and_state_round_trip():
    w1 = torch.nn.Parameter(torch.ones(1, 1, 3, 3))
    w2 = torch.nn.Parameter(torch.ones(2, 1, 3, 3))
    meter = ImportanceMeter({"a": w1, "b": w2}, decay=0.5)
    assert meter.importance()["a"].abs().sum() == 0  # before any batch
    w1.grad = torch.full_like(w1, 3.0)
    meter.update(grad_correction={"a": torch.full_like(w1, 1.0)})  # b has no grad: scores zero this batch
    assert meter.importance()["a"][0, 0, 0].item() == pytest.approx(4.0)
    assert meter.importance()["b"].abs().sum() == 0
    w2.grad = torch.full_like(w2, 2.0)
    meter.update()
    # a: EMA of 4 then 9 with weights 0.5*0.5 and 0.5, normalised by 0.75; b: 0 then 4
    assert meter.importance()["a"][0, 0, 0].item() == pytest.approx((0.25 * 4 + 0.5 * 9) / 0.75)
    assert meter.importance()["b"][0, 0, 0].item() == pytest.approx(0.5 * 4 / 0.75)
    clone = ImportanceMeter({"a": w1, "b": w2}, decay=0.5)
    clone.load_state_dict(meter.state_dict())
    for name in ("a", "b"):
        assert torch.equal(clone.importance()[name], meter.importance()[name])
    with pytest.raises(ValueError):
        ImportanceMeter({"a": w1}).load_state_dict(meter.state_dict())


def test_magnitude_importance_is_w_squared_per_tap():
    w = torch.arange(18.0).reshape(2, 1, 3, 3)
    assert torch.equal(magnitude_importance({"l": w})["l"], w.square().reshape(2, 1, 9))


def test_gradient_average_squares_the_mean_first_order_term():
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64))
    grads = [torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    meter = ImportanceMeter({"l": w}, average="gradient")
    for grad in grads:
        w.grad = grad
        meter.update()
    expected = (w.detach() * sum(grads) / 4).square().reshape(2, 2, 9)
    assert torch.allclose(meter.importance()["l"].double(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="average"):
        ImportanceMeter({"l": w}, average="median")
