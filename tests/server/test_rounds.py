"""The round engine: sites are sampled as FedAvg does and each is told its rounds left; every
reply is recorded by what it was (a sampled site that sends nothing has failed), only valid ones
change the global student, a round with too few of them fails, and failed rounds in a row stop
the run."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import payload as P
from common.config import load_config
from common.site_registry import SiteRegistry
from common.tasks import build_task
from server.exchange import WeightsExchange
from server.rounds import FAILED, INVALID, NO_REPLY, REFUSED, TRAINED, ParticipationPlan, RoundEngine


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


@pytest.fixture
def make_engine(tmp_path, cache_dir):
    # the plain mean, without the server's distillation toward the teacher after it
    config = load_config(["task=digits", "sites=4", "rounds=2", "exchange.server.distill_teacher=false",
                          f"run_dir={tmp_path}", f"cache_dir={cache_dir}"])
    task = build_task(config)

    def make(rounds: int = 2, **limits) -> RoundEngine:
        torch.manual_seed(0)
        student = task.student(config.student)
        return RoundEngine(exchange=WeightsExchange(config, task, student), global_student=student,
                           plan=ParticipationPlan(rounds=rounds, fraction=1.0, min_sites=1, seed=0),
                           allowed_items=set(P.released_items(mode="weights", weighting="uniform", dp=True)),
                           assets={P.TEACHER_SHA256: "t"}, request="{}", **limits)
    return make


@pytest.fixture
def engine(make_engine) -> RoundEngine:
    return make_engine()


def trained(weights: dict[str, np.ndarray], site: str) -> RecordDict:
    return RecordDict({
        P.ARRAYS: ArrayRecord({name: Array(value) for name, value in weights.items()}),
        P.METRICS: MetricRecord({P.EPSILON_SPENT: 1.0}),
        P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_OK, P.SITE: site}),
    })


def weights_of(engine: RoundEngine) -> dict[str, np.ndarray]:
    return {name: array.numpy().copy() for name, array in P.model_to_record(engine.global_student).items()}


def test_each_sampled_node_is_sent_the_round_and_its_rounds_left(engine):
    contents = engine.configure(1, [7, 9])
    assert sorted(contents) == [7, 9]
    for content in contents.values():
        assert content[P.CONFIG][P.SERVER_ROUND] == 1 and content[P.CONFIG][P.ROUNDS_LEFT] == 2
        assert content[P.CONFIG][P.TEACHER_SHA256] == "t" and P.ARRAYS in content.array_records
    assert engine.rounds[1].sampled == 2 and engine.rounds[1].bytes_down > 0


def test_only_valid_replies_are_combined_and_every_reply_is_recorded_by_what_it_was(engine):
    engine.configure(1, [1, 2, 3, 4])
    start = weights_of(engine)
    moved = {name: value + 1 for name, value in start.items()}
    refused = RecordDict({P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_REFUSED, P.SITE: "site-c", P.REASON: "budget"})})
    broken = trained({name: np.full_like(value, np.nan) for name, value in start.items()}, "site-d")
    combined = engine.aggregate(1, [(1, trained(moved, "site-a")), (2, "the node went away"), (3, refused), (4, broken)])
    assert combined == 1
    outcome = engine.rounds[1]
    assert [(s.site, s.status) for s in outcome.sites] == [("site-a", TRAINED), ("node-2", FAILED),
                                                           ("site-c", REFUSED), ("site-d", INVALID)]
    assert outcome.sites[1].reason == "the node went away" and outcome.bytes_up > 0
    assert all(np.allclose(weights_of(engine)[name], moved[name]) for name in start)


def test_sites_are_named_by_the_coordinators_register_and_an_unpinned_app_is_a_refusal_with_code_app(
        make_engine, tmp_path):
    registry = SiteRegistry(tmp_path / "sites.json")
    registry.add(1, "hospital-a")
    registry.add(2, "hospital-b")
    engine = make_engine(registry=registry)
    engine.configure(1, [1, 2, 3])
    start = weights_of(engine)
    app_error = ("Error: ClientApp exited: fedistill.app_gate.AppNotVetted: the coordinator sent app 1f2e, which is "
                 "not one this site pinned")
    engine.aggregate(1, [(1, trained({n: v + 1 for n, v in start.items()}, "claims-to-be-c")), (2, app_error),
                         (3, "the node went away")])
    sites = engine.rounds[1].sites
    assert [(s.site, s.status, s.code) for s in sites] == [("hospital-a", TRAINED, ""), ("hospital-b", REFUSED, "app"),
                                                           ("node-3", FAILED, "")]
    assert "pinned" in sites[1].reason and "1f2e" not in sites[1].reason
    assert engine.nodes_seen == {1, 2, 3}


def test_a_round_without_a_valid_reply_leaves_the_global_student_as_it_was(engine):
    engine.configure(1, [1])
    start = weights_of(engine)
    assert engine.aggregate(1, [(1, "timed out")]) == 0
    assert all(np.array_equal(weights_of(engine)[name], start[name]) for name in start)
    assert engine.rounds[1].failed == "0 valid replies from 1 sampled sites, fewer than federation.min_replies=1"


def test_a_sampled_site_that_sends_nothing_has_failed(engine):
    engine.configure(1, [1, 2, 3])
    start = weights_of(engine)
    assert engine.aggregate(1, [(2, trained({n: v + 1 for n, v in start.items()}, "site-b"))]) == 1
    assert [(s.site, s.status, s.reason) for s in engine.rounds[1].sites] == [
        ("site-b", TRAINED, ""), ("node-1", FAILED, NO_REPLY), ("node-3", FAILED, NO_REPLY)]
    assert not engine.rounds[1].failed


def test_a_round_with_fewer_valid_replies_than_min_replies_fails_and_changes_nothing(make_engine):
    engine = make_engine(min_replies=2)
    engine.configure(1, [1, 2, 3])
    start = weights_of(engine)
    refused = RecordDict({P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_REFUSED, P.SITE: "site-b", P.REASON: "budget"})})
    assert engine.aggregate(1, [(1, trained({n: v + 1 for n, v in start.items()}, "site-a")), (2, refused)]) == 0
    assert engine.rounds[1].failed == "1 valid replies from 3 sampled sites, fewer than federation.min_replies=2"
    assert all(np.array_equal(weights_of(engine)[name], start[name]) for name in start)
    engine.configure(2, [1, 2, 3])
    assert engine.aggregate(2, [(n, trained({k: v + 1 for k, v in start.items()}, f"site-{n}")) for n in (1, 2)]) == 2
    assert not engine.rounds[2].failed


def test_after_max_failed_rounds_in_a_row_no_more_rounds_are_run(make_engine):
    engine = make_engine(rounds=6, max_failed_rounds=2)
    start = weights_of(engine)
    engine.configure(1, [1])
    engine.aggregate(1, [])  # failed
    engine.configure(2, [1])
    engine.aggregate(2, [(1, trained({n: v + 1 for n, v in start.items()}, "site-a"))])  # combined: the count restarts
    for server_round in (3, 4):
        assert engine.configure(server_round, [1])
        engine.aggregate(server_round, [(1, "the node went away")])
    assert engine.stopped
    assert engine.configure(5, [1]) == {} and engine.aggregate(5, []) == 0
    assert engine.rounds[5].failed.startswith("not run: the 2 rounds before it failed")
    assert [bool(engine.rounds[r].failed) for r in range(1, 6)] == [True, False, True, True, True]


def test_a_run_goes_on_after_failed_rounds_when_max_failed_rounds_is_0(make_engine):
    engine = make_engine(rounds=5, max_failed_rounds=0)
    for server_round in range(1, 6):
        assert engine.configure(server_round, [1])
        engine.aggregate(server_round, [])
    assert not engine.stopped


def test_a_combine_that_fails_part_way_restores_the_previous_global_student(engine, monkeypatch):
    engine.configure(1, [1])
    start = weights_of(engine)

    def half_done(replies, student, server_round, weights=None):
        with torch.no_grad():
            next(student.parameters()).add_(5.0)
        raise RuntimeError("the server's distillation ran out of memory")

    monkeypatch.setattr(engine.exchange, "combine", half_done)
    assert engine.aggregate(1, [(1, trained({n: v + 1 for n, v in start.items()}, "site-a"))]) == 0
    assert "ran out of memory" in engine.rounds[1].server["error"]
    assert engine.rounds[1].failed.startswith("combining 1 replies failed: RuntimeError")
    assert all(np.array_equal(weights_of(engine)[name], start[name]) for name in start)


def test_weights_given_by_node_override_the_exchanges_equal_weighting(engine):
    engine.configure(1, [1, 2])
    start = weights_of(engine)
    zero = {name: np.zeros_like(value) for name, value in start.items()}
    four = {name: np.full_like(value, 4.0) for name, value in start.items()}
    engine.aggregate(1, [(1, trained(zero, "site-a")), (2, trained(four, "site-b"))], weights={1: 3.0, 2: 1.0})
    assert all(np.allclose(value, 1.0) for value in weights_of(engine).values())  # (3*0 + 1*4) / 4
