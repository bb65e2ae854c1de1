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


# --- whole students: Krum, Multi-Krum, Bulyan and the server's clipping ---

from server.aggregate import StudentAggregator  # noqa: E402

START = {"w": np.zeros((2, 3)), "b": np.zeros(3)}


def _students(honest: int, hostile: int, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`honest` students near 1 in every weight, then `hostile` ones far away at -20."""
    rng = np.random.default_rng(seed)
    near = [{k: 1 + 0.05 * rng.standard_normal(v.shape) for k, v in START.items()} for _ in range(honest)]
    return near + [{k: np.full(v.shape, -20.0) for k, v in START.items()} for _ in range(hostile)]


def _combine(method: str, students, *, assumed_hostile=0.2, clip_norm=None, weights=None):
    aggregator = StudentAggregator(method=method, trim_fraction=0.2, assumed_hostile=assumed_hostile, clip_norm=clip_norm)
    return aggregator(students, np.ones(len(students)) if weights is None else weights, START)


def test_krum_picks_the_honest_student_closest_to_the_others():
    students = _students(4, 1)
    students[2] = {k: np.ones_like(v) for k, v in START.items()}  # the honest centre: exactly 1
    combined, report = _combine("krum", students)
    assert report == {"hostile_assumed": 1, "selected": 1}
    assert all(np.array_equal(combined[k], students[2][k]) for k in START)


@pytest.mark.parametrize("method, selected", [("multikrum", 4), ("bulyan", 3)])
def test_multikrum_and_bulyan_leave_out_the_hostile_students(method, selected):
    combined, report = _combine(method, _students(6, 1), assumed_hostile=0.15)  # f = floor(0.15 x 7) = 1
    assert report["selected"] == {"multikrum": 6, "bulyan": 5}[method]
    assert all(np.allclose(combined[k], 1, atol=0.1) for k in START)
    mean, _ = _combine("mean", _students(6, 1))
    assert mean["w"].mean() < -1  # the mean is dragged away


def test_multikrum_averages_the_kept_students_by_their_weights():
    students = [{k: np.full(v.shape, x) for k, v in START.items()} for x in (1.0, 1.1, 1.2, -50.0)]
    combined, report = _combine("multikrum", students, assumed_hostile=0.25, weights=np.array([1.0, 1.0, 2.0, 1.0]))
    assert report["selected"] == 3
    assert combined["b"] == pytest.approx([(1.0 + 1.1 + 2 * 1.2) / 4] * 3)


def test_bulyan_refuses_too_few_replies_for_the_hostile_share_it_assumes():
    with pytest.raises(ValueError, match=r"4f \+ 3 = 11 replies with f = 2.*exchange.assumed_hostile"):
        _combine("bulyan", _students(8, 2))


def test_the_server_clips_each_update_to_the_norm_around_the_global_student():
    far = {k: np.full(v.shape, 3.0) for k, v in START.items()}  # update norm 3 x sqrt(9) = 9
    near = {k: np.full(v.shape, 0.1) for k, v in START.items()}  # norm 0.3: kept as it is
    combined, report = _combine("mean", [far, near], clip_norm=1.5)
    assert report == {"clipped": 1}
    assert combined["w"] == pytest.approx(np.full((2, 3), (3.0 * 1.5 / 9 + 0.1) / 2))
