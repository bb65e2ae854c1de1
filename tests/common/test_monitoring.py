"""The metrics both sides export say what the ledger, the activity log and the rounds say."""

from prometheus_client import CollectorRegistry, generate_latest

from common.monitoring import SERVER_METRICS, SITE_METRICS, SiteCollector, record_activity
from common.privacy import LEDGER_FILE, Budget, DataFingerprint, PrivacyLedger
from server.metrics import ServerMetrics


def site_metrics(ledger_dir, budget) -> str:
    registry = CollectorRegistry()
    registry.register(SiteCollector(ledger_dir, site="site-a", budget=budget))
    return generate_latest(registry).decode()


def test_a_sites_metrics_are_its_ledger_and_its_activity_log(tmp_path):
    budget = Budget(3.0, 1e-5)
    ledger = PrivacyLedger(tmp_path, budget=budget, data=DataFingerprint(dataset="d", partition="p", records="r"))
    ledger.reserve(limit=budget, noise_multiplier=2.0, sample_rate=0.05, steps=20, run="1", round=1)
    record_activity(tmp_path, run="1", server_round=1, status="ok", steps=20)
    record_activity(tmp_path, run="1", server_round=2, status="refused", code="budget")
    text = site_metrics(tmp_path, budget)
    spent = ledger.epsilon_spent()
    assert f'fedistill_site_epsilon_spent{{site="site-a"}} {spent}' in text
    assert f'fedistill_site_epsilon_left{{site="site-a"}} {3.0 - spent}' in text
    assert 'fedistill_site_dp_steps_total{site="site-a"} 20.0' in text
    assert 'fedistill_site_rounds_trained_total{site="site-a"} 1.0' in text
    assert "seconds" not in text  # how long a site works grows with its number of records
    assert 'fedistill_site_refusals_total{code="budget",site="site-a"} 1.0' in text
    assert 'fedistill_site_ledger_readable{site="site-a"} 1.0' in text
    assert {name for name in SITE_METRICS if name in text} == set(SITE_METRICS)


def test_a_corrupt_ledger_shows_as_unreadable_not_as_an_unspent_budget(tmp_path):
    (tmp_path / LEDGER_FILE).write_text("{ not json")
    text = site_metrics(tmp_path, Budget(3.0, 1e-5))
    assert 'fedistill_site_ledger_readable{site="site-a"} 0.0' in text
    assert "fedistill_site_epsilon_left{" not in text


def test_the_coordinator_counts_each_round_from_its_record():
    metrics = ServerMetrics(("accuracy",))
    record = {"round": 2, "sites_sampled": 3, "sites_trained": 1, "sites_refused": 1, "sites_failed": 0,
              "sites_invalid": 1, "aggregation_s": 0.2, "round_s": 4.0, "eval_s": 1.0, "accuracy": 0.8,
              "bytes_up": 100, "bytes_down": 300, "epsilon": {"site-0": 1.5, "site-1": None}}
    metrics.observe_round(record)
    text = generate_latest(metrics.registry).decode()
    for line in ("fedistill_server_round 2.0", "fedistill_server_sites_sampled_total 3.0",
                 "fedistill_server_replies_received_total 1.0", "fedistill_server_replies_refused_total 1.0",
                 "fedistill_server_replies_dropped_total 1.0", "fedistill_server_replies_failed_total 0.0",
                 'fedistill_server_student_metric{metric="accuracy"} 0.8', 'fedistill_server_bytes_total{direction="up"} 100.0',
                 'fedistill_server_site_epsilon{site="site-0"} 1.5', "fedistill_server_round_seconds_sum 5.0",
                 "fedistill_server_aggregation_seconds_count 1.0"):
        assert line in text
    assert {name for name in SERVER_METRICS if name in text} == set(SERVER_METRICS)
