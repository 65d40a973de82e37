"""Distillation loss against a hand computation, and models whose output is already a softmax."""

import math

import numpy as np
import pytest
import torch

from ctprune.train.distill import as_logits, combined_loss, distillation_loss, looks_like_probabilities


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def test_distillation_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((4, 5)), rng.standard_normal((4, 5)) * 3
    temperature = 3.0
    expected = 0.0
    for i in range(4):
        p, q = _softmax(t[i] / temperature), _softmax(s[i] / temperature)
        expected += sum(p[j] * math.log(p[j] / q[j]) for j in range(5))
    expected = expected / 4 * temperature**2
    got = distillation_loss(torch.tensor(s), torch.tensor(t), temperature).item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert distillation_loss(torch.tensor(t), torch.tensor(t), temperature).item() == pytest.approx(0, abs=1e-12)


def test_combined_loss_weights_both_terms():
    rng = np.random.default_rng(1)
    s, t = torch.tensor(rng.standard_normal((6, 3))), torch.tensor(rng.standard_normal((6, 3)))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    ce = float(np.mean([-math.log(_softmax(s[i].numpy())[y[i]]) for i in range(6)]))
    kd = distillation_loss(s, t, 2.0).item()
    assert combined_loss(s, t, y, 2.0, 0.3).item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-9)
    assert combined_loss(s, t, None, 2.0, 0.3).item() == pytest.approx(kd, rel=1e-9)  # no labels: KD only
    assert combined_loss(s, None, y, 2.0, 0.3).item() == pytest.approx(ce, rel=1e-9)  # no teacher: CE only


def test_softmax_outputs_distil_like_their_logits():
    rng = np.random.default_rng(2)
    s, t = torch.tensor(rng.standard_normal((5, 7))), torch.tensor(rng.standard_normal((5, 7)))
    ps, pt = s.softmax(1), t.softmax(1)
    assert looks_like_probabilities(pt) and not looks_like_probabilities(t)
    from_probs = distillation_loss(as_logits(ps, True), as_logits(pt, True), 4.0)
    assert from_probs.item() == pytest.approx(distillation_loss(s.float(), t.float(), 4.0).item(), rel=1e-4)


def test_spatial_outputs_average_over_positions():
    rng = np.random.default_rng(3)
    s, t = torch.tensor(rng.standard_normal((2, 4, 3, 3))), torch.tensor(rng.standard_normal((2, 4, 3, 3)))
    flat_s = as_logits(s, False).permute(0, 2, 1).reshape(-1, 4)
    flat_t = as_logits(t, False).permute(0, 2, 1).reshape(-1, 4)
    got = distillation_loss(as_logits(s, False), as_logits(t, False), 2.0).item()
    assert got == pytest.approx(distillation_loss(flat_s, flat_t, 2.0).item(), rel=1e-6)
