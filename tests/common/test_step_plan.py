"""The DP-aware rule: a step plan from the run's settings and a declared size class, never a record count."""

import dataclasses

import pytest

from common.config import load_config
from common.step_plan import DEFAULT_SIZE_CLASS, plan_round, size_class


@pytest.mark.parametrize("declared, cls", [(None, DEFAULT_SIZE_CLASS), (1, 1), (7, 5), (199, 100), (200, 200),
                                           (499, 200), (590, 500), (1475, 1000), (20_000, 20_000), (73_512, 50_000)])
def test_a_declared_size_is_rounded_down_to_its_class(declared, cls):
    assert size_class(declared) == cls


def _plan(*overrides, size):
    config = load_config(["task=digits", *overrides])
    plan = plan_round(config.distill, config.privacy, size)
    return plan.sample_rate, plan.steps, plan.expected_batch_size, plan.lr


@pytest.mark.parametrize("epsilon, size, expected", [
    (1, 500, (256 / 500, 1, 256, 0.25)),      # large batches, one epoch on a small budget
    (1.9, 5000, (256 / 5000, 19, 256, 0.25)),
    (1, 100, (1.0, 1, 100, 0.25)),            # a class smaller than the batch: every record, every step
    (2, 500, (64 / 500, 3 * 7, 64, 0.25)),    # small batches, three epochs from epsilon 2
    (8, 500, (64 / 500, 3 * 7, 64, 0.25)),
    (3, 40, (1.0, 3, 40, 0.25)),
])
def test_under_dp_the_rule_takes_large_batches_on_a_small_budget_and_small_ones_above(epsilon, size, expected):
    assert _plan(f"privacy.epsilon={epsilon}", size=size) == pytest.approx(expected)


@pytest.mark.parametrize("size, expected", [(500, (64 / 500, 3 * 7, 64, 0.05)), (40, (1.0, 3, 40, 0.05))])
def test_without_dp_the_rule_takes_small_batches_three_epochs_and_a_smaller_step(size, expected):
    assert _plan("privacy=none", size=size) == pytest.approx(expected)


def test_what_the_run_sets_wins_over_the_rule():
    assert _plan("distill.sample_rate=0.1", "distill.local_epochs=3", "distill.batch_size=64", "distill.lr=0.3",
                 size=500) == (0.1, 30, 64, 0.3)
    rate, steps, batch, lr = _plan("distill.local_epochs=5", size=500)
    assert (rate, batch, lr) == (64 / 500, 64, 0.25) and steps == 5 * 7


def test_the_plan_reads_no_record_count():
    """plan_round's inputs are the run's settings and a size class: nothing else reaches it."""
    config = load_config(["task=digits"])
    fields = {f.name for f in dataclasses.fields(type(config.distill))}
    assert {"sample_rate", "local_epochs", "batch_size", "lr"} <= fields
    assert plan_round.__code__.co_varnames[:3] == ("distill", "privacy", "size")
