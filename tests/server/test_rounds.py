"""The participation plan: sites are sampled as FedAvg does, and each is told its rounds left."""

import pytest

from server.strategy import ParticipationPlan


def _run(plan, nodes, rounds):
    return {r: plan.sample(r, nodes) for r in range(1, rounds + 1)}


@pytest.mark.parametrize("fraction, nodes, per_round", [(0.5, 4, 2), (1.0, 3, 3), (0.1, 10, 2)])
def test_each_round_samples_a_fraction_of_the_sites_and_at_least_min_sites(fraction, nodes, per_round):
    plan = ParticipationPlan(rounds=6, fraction=fraction, min_sites=2, seed=0)
    for sampled in _run(plan, list(range(nodes)), 6).values():
        assert len(sampled) == per_round


def test_rounds_left_counts_exactly_the_rounds_each_site_will_be_sampled_in():
    plan = ParticipationPlan(rounds=8, fraction=0.5, min_sites=1, seed=3)
    rounds = _run(plan, [11, 22, 33, 44], 8)
    for r, sampled in rounds.items():
        for node, left in sampled.items():
            assert left == sum(node in rounds[later] for later in range(r, 9))
    last = {node: max(r for r, s in rounds.items() if node in s) for node in {n for s in rounds.values() for n in s}}
    assert all(rounds[r][node] == 1 for node, r in last.items())  # told when a round is its last


def test_the_plan_is_redrawn_for_the_remaining_rounds_when_sites_change():
    plan = ParticipationPlan(rounds=4, fraction=1.0, min_sites=1, seed=0)
    assert plan.sample(1, [1, 2]) == {1: 4, 2: 4}
    assert plan.sample(2, [1, 2, 3]) == {1: 3, 2: 3, 3: 3}
