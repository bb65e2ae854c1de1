import numpy as np
import pytest

from server.aggregate import aggregate

HONEST = np.array([[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1.0, 2.0]])
ATTACK = np.vstack([HONEST, [[1e6, -1e6]]])


def test_mean_is_weighted_by_examples():
    out = aggregate(np.array([[0.0], [10.0]]), np.array([1, 3]), method="mean")
    assert out == pytest.approx([7.5])


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregators_ignore_one_extreme_site(method):
    out = aggregate(ATTACK, np.ones(5), method=method, trim_fraction=0.2)
    assert out == pytest.approx([1.0, 2.0], abs=0.1)
    assert abs(aggregate(ATTACK, np.ones(5), method="mean")[0]) > 1e5  # the plain mean is pulled away


def test_robust_aggregators_cannot_be_moved_by_claimed_examples():
    weights = np.array([1, 1, 1, 1, 10_000])
    assert aggregate(ATTACK, weights, method="median") == pytest.approx([1.0, 2.0], abs=0.1)


def test_trimmed_mean_matches_hand_computation():
    stack = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert aggregate(stack, np.ones(5), method="trimmed_mean", trim_fraction=0.2) == pytest.approx([2.0])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="trimmed_mean"):
        aggregate(HONEST, np.ones(4), method="mode")


def test_trimmed_mean_still_trims_a_small_federation():
    stack = np.array([[0.0], [1.0], [1000.0]])
    assert aggregate(stack, np.ones(3), method="trimmed_mean", trim_fraction=0.2) == pytest.approx([1.0])
