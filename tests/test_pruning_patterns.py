"""Pattern library generation and per-kernel pattern assignment."""

import itertools

import numpy as np
import pytest
import torch

from ctprune.errors import RatioError
from ctprune.pruning.patterns import ALL_PATTERNS, PatternLibrary, top4_codes


def planted_importance(rng, shapes_and_counts, noise=0.05):
    """(N, 1, 9) importance: each planted shape gets `count` kernels with high taps on it plus small noise."""
    rows = []
    for taps, count in shapes_and_counts:
        imp = rng.random((count, 9)) * noise
        imp[:, list(taps)] += 1.0 + rng.random((count, 4))
        rows.append(imp)
    imp = np.concatenate(rows)
    rng.shuffle(imp)
    return torch.tensor(imp, dtype=torch.float32).reshape(-1, 1, 9)


def test_generation_finds_planted_patterns_in_frequency_order():
    rng = np.random.default_rng(1)
    planted = [((0, 1, 3, 4), 40), ((1, 3, 4, 5), 30), ((4, 5, 7, 8), 20), ((0, 2, 6, 8), 10)]
    imp = planted_importance(rng, planted)
    # Split over two layers: counting must be network-wide.
    lib = PatternLibrary.generate({"a": imp[:37].reshape(37, 1, 9), "b": imp[37:].reshape(1, -1, 9)}, size=4)
    assert lib.patterns.tolist() == [list(t) for t, _ in planted]


def test_generation_ignores_non_voters():
    rng = np.random.default_rng(2)
    imp = planted_importance(rng, [((0, 1, 3, 4), 10), ((2, 4, 6, 8), 30)]).reshape(1, 40, 9)
    voters = torch.zeros(1, 40, dtype=torch.bool)
    voters[0, top4_codes(imp)[0] == (1 + 2 + 8 + 16)] = True  # only the top-left-square kernels vote
    lib = PatternLibrary.generate({"l": imp}, size=1, voters={"l": voters})
    assert lib.patterns.tolist() == [[0, 1, 3, 4]]


def test_generation_fills_with_importance_mass_when_few_shapes_voted():
    imp = torch.zeros(4, 4, 9)
    imp[..., [0, 1, 3, 4]] = 1.0
    imp[..., 8] = 0.5  # the next shapes by kept mass all include tap 8
    lib = PatternLibrary.generate({"l": imp}, size=5)
    assert lib.patterns[0].tolist() == [0, 1, 3, 4]
    assert len({tuple(p) for p in lib.patterns.tolist()}) == 5
    assert all(8 in p for p in lib.patterns[1:].tolist())


@pytest.mark.parametrize("size", [0, 127])
def test_generation_rejects_impossible_sizes(size):
    with pytest.raises(RatioError, match="--patterns"):
        PatternLibrary.generate({"l": torch.rand(2, 2, 9)}, size=size)


def test_assignment_is_exact_on_crafted_importance():
    lib = PatternLibrary(np.array([[0, 1, 3, 4], [1, 3, 4, 5], [4, 5, 7, 8]]))
    imp = torch.zeros(2, 2, 9)
    imp[0, 0, [4, 5, 7, 8]] = 1.0  # exactly pattern 2
    imp[0, 1, [1, 3, 4, 5]] = 1.0
    imp[0, 1, 0] = 0.9  # pattern 0 keeps 0,1,3,4 = 3.9 < pattern 1's 4.0
    imp[1, 0, :] = 1.0  # all tie at 4.0 -> the lowest id
    imp[1, 1, [0, 8]] = torch.tensor([5.0, 5.1])  # pattern 2 (has tap 8) beats pattern 0 (tap 0)
    assert lib.assign(imp).tolist() == [[2, 1], [0, 2]]


def test_assignment_matches_brute_force_on_random_importance():
    rng = np.random.default_rng(3)
    lib = PatternLibrary(ALL_PATTERNS[rng.choice(len(ALL_PATTERNS), 12, replace=False)])
    imp = torch.tensor(rng.random((7, 5, 9)), dtype=torch.float64)
    got = lib.assign(imp)
    for o, c in itertools.product(range(7), range(5)):
        sums = [float(imp[o, c, list(p)].sum()) for p in lib.patterns]
        assert got[o, c].item() == int(np.argmax(sums))
        assert lib.kept_importance(imp, got)[o, c].item() == pytest.approx(max(sums))
    masks = lib.tap_masks(got)
    assert masks.sum(-1).eq(4).all()


def test_library_rejects_malformed_patterns():
    with pytest.raises(ValueError):
        PatternLibrary(np.array([[0, 0, 1, 2]]))
    with pytest.raises(ValueError):
        PatternLibrary(np.array([[0, 1, 2, 9]]))
    with pytest.raises(ValueError):
        PatternLibrary(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]))
