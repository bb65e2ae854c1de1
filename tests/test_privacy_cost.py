"""`make bench-privacy` measures the frontiers every task kind declares and checks their targets."""

from bench.privacy_cost import settings, targets
from common.task_config import task_kinds


def frontier(points: dict[float, float], public: float, no_dp: float, teacher: float) -> dict:
    return {"points": [{"epsilon": e, "mean": m} for e, m in points.items()], "public_only": {"mean": public},
            "no_dp": {"mean": no_dp}, "teacher": teacher}


def test_every_task_kinds_frontiers_are_measured_under_distinct_names():
    names = [s.name for s in settings()]
    assert len(names) == len(set(names))
    for kind in task_kinds().values():
        assert {s.name for s in kind.frontiers} <= set(names)
        assert all(t.value[0] in names and t.bar[0] in names for t in kind.frontier_targets)


def test_a_target_is_met_only_when_the_figure_beats_its_bar_and_unmeasured_ones_are_left_out():
    results = {"mnist": frontier({1.0: 0.90, 3.0: 0.80, 8.0: 0.9}, public=0.86, no_dp=0.9, teacher=0.95),
               "lm-logits": frontier({8.0: 20.0}, public=25.0, no_dp=18.0, teacher=10.0)}
    by_label = {c["target"]: c for c in targets(results)}
    assert len(by_label) == 3  # two MNIST targets and the code model's; no setting of another is run
    mnist3 = by_label["MNIST: epsilon 3 keeps >= 92% of the non-private accuracy"]
    assert (mnist3["bar"], mnist3["met"]) == (0.92 * 0.9, False)
    mnist1 = by_label["MNIST: epsilon 1 beats public-only by >= 5 points"]
    assert mnist1["met"] is False and abs(mnist1["margin"] - (0.90 - 0.91)) < 1e-9
    lm = next(c for c in by_label.values() if "perplexity" in c["target"])
    assert lm["met"] is True and lm["margin"] == 5.0  # lower is better: 20 below 25
