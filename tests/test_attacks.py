"""Hostile sites against the aggregators, in small real federations: the sites' own DP round
(seeded) and the server's exchange in one process (fedistill.inprocess), and once through
Flower's simulation engine. Each hostile kind hurts the plain mean and is stopped by its
aggregator. The weights runs leave out the server's distillation toward the teacher, which
repairs much of any attack by itself (the attack benchmark shows both)."""

from __future__ import annotations

import json

import pytest

from client.hostile import backdoor_rate
from common.config import load_config
from fedistill.inprocess import federate
from tests.test_simulate import simulate

BASE = ["task=digits", "sites=5", "rounds=2", "federation.hostile.fraction=0.2"]  # one hostile site of five
WEIGHTS = [*BASE, "exchange.server.distill_teacher=false"]
LOGITS = [*BASE, "exchange=logits"]


@pytest.fixture
def score(tmp_path, cache_dir):
    runs = iter(range(1000))

    def run(*overrides: str) -> dict:
        config = load_config([*overrides, f"cache_dir={cache_dir}", f"run_dir={tmp_path / str(next(runs))}"])
        return federate(config, dp_seed=0, also=backdoor_rate)[0]
    return run


# Bulyan needs 4f + 3 replies: seven sites for one assumed hostile
SEVEN = ["sites=7", "federation.hostile.fraction=0.15", "exchange.assumed_hostile=0.15"]


@pytest.mark.parametrize("kind, robust, more", [("scale", "median", []), ("sign_flip", "median", []),
                                                ("random", "krum", []), ("constant", "median", []),
                                                ("sign_flip", "bulyan", SEVEN)])
def test_a_hostile_weights_kind_hurts_the_mean_and_is_stopped_by_its_aggregator(score, kind, robust, more):
    clean = score(*WEIGHTS, *more)["accuracy"]
    attacked = score(*WEIGHTS, *more, f"federation.hostile.kind={kind}")["accuracy"]
    defended = score(*WEIGHTS, *more, f"federation.hostile.kind={kind}", f"exchange.aggregation={robust}")["accuracy"]
    assert attacked < clean - 0.02
    assert defended > clean - 0.02


def test_a_model_replacement_plants_its_backdoor_through_the_mean_and_not_through_krum(score):
    clean = score(*WEIGHTS)
    attacked = score(*WEIGHTS, "federation.hostile.kind=backdoor")
    defended = score(*WEIGHTS, "federation.hostile.kind=backdoor", "exchange.aggregation=krum")
    assert attacked["backdoor"] > clean["backdoor"] + 0.3
    assert defended["backdoor"] < clean["backdoor"] + 0.05


def test_the_servers_update_clipping_bounds_a_model_replacement(score):
    clean = score(*WEIGHTS)
    clipped = score(*WEIGHTS, "federation.hostile.kind=scale", "exchange.clip_update_norm=1.0")
    assert clipped["accuracy"] > clean["accuracy"] - 0.02


@pytest.mark.parametrize("kind", ["inverted", "uniform"])
def test_hostile_distributions_pull_the_mean_consensus_and_not_the_median(score, kind):
    clean = score(*LOGITS)["loss"]
    attacked = score(*LOGITS, f"federation.hostile.kind={kind}")["loss"]
    defended = score(*LOGITS, f"federation.hostile.kind={kind}", "exchange.aggregation=median")["loss"]
    assert attacked > clean + 0.03
    assert defended < clean + 0.03


@pytest.mark.e2e
def test_a_simulation_with_hostile_sites_records_them_and_its_aggregation(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = simulate(run_dir, *WEIGHTS, "federation.hostile.kind=sign_flip", "exchange.aggregation=multikrum",
                      "exchange.clip_update_norm=10", f"cache_dir={cache_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["aggregation"] == {"method": "multikrum", "assumed_hostile": 0.2, "replies_selected": 8,
                                      "clip_update_norm": 10.0, "replies_clipped": 2,
                                      "hostile": {"kind": "sign_flip", "fraction": 0.2, "sites": 1}}
    assert summary["student"]["accuracy"] > 0.85
