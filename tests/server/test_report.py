from common import payload as P
from common.config import load_config
from common.evaluation import Metric
from server.report import PrivacyView, privacy_report
from server.rounds import REFUSED, TRAINED, RoundOutcome, SiteOutcome


def _view():
    view = PrivacyView()
    view.update(1, RoundOutcome(sites=[SiteOutcome("site-0", 1, TRAINED, epsilon_spent=1.5, epsilon_budget=3.0, noise_multiplier=2.0),
                                       SiteOutcome("site-1", 2, REFUSED, reason="budget spent", code="budget",
                                                   epsilon_spent=3.0, epsilon_budget=3.0)]))
    return view


def test_report_states_the_guarantee_and_lists_what_leaves_a_site():
    summary = _view().summary(load_config(["exchange=logits"]))
    assert summary["neighbouring_relation"] == "add/remove one record"
    # logits mode sends no weights, and uniform weighting no count
    assert set(summary["released"]) == set(P.RELEASED_UNDER_DP) - {P.ARRAYS, f"{P.METRICS}/{P.NOISY_COUNT}"}
    noisy = _view().summary(load_config(["exchange.weighting=noisy_count"]))
    assert f"{P.METRICS}/{P.NOISY_COUNT}" in noisy["released"] and P.LOGITS not in noisy["released"]
    assert "post-processing" in summary["released"][P.LOGITS]
    assert [(s["site"], s["epsilon"], s["rounds_trained"], s["refused_rounds"]) for s in summary["sites"]] == [
        ("site-0", 1.5, 1, 0), ("site-1", 3.0, 0, 1)]
    text = privacy_report(summary)
    assert "round 1, site-1 (budget): budget spent" in text
    for item in summary["released"]:
        assert f"`{item}`" in text
    assert "record count" in text and "must still trust" in text


def test_report_without_dp_claims_no_guarantee():
    summary = _view().summary(load_config(["privacy=none"]))
    assert P.RELEASED_WITHOUT_DP.keys() <= summary["released"].keys()
    assert "WITHOUT differential privacy" in summary["mechanism"]
    assert summary["guarantee"].startswith("none")


def test_report_of_sites_sharing_records_states_what_a_record_may_compose_to():
    shared = _view().summary(load_config(["task.sites_per_record=4"]))
    assert "held by 4 sites" in privacy_report(shared) and "(4 x 3 = 12)" in privacy_report(shared)
    assert "held by" not in privacy_report(_view().summary(load_config([])))


def test_the_progress_line_names_the_sites_that_refused_and_why():
    from server.report import progress_line

    config = load_config(["task=digits", "rounds=2"])
    problems = [{"site": f"site-{i}", "status": REFUSED, "code": code, "reason": ""}
                for i, code in enumerate(["app", "budget", "policy", "ledger"])]
    record = {"round": 1, "sites_trained": 1, "sites_refused": 4, "sites_failed": 0, "sites_invalid": 0, "problems": problems,
              "accuracy": 0.5, "agreement": 0.5, "epsilon": {}, "elapsed_s": 3.0, "round_failed": None}
    metrics = (Metric("accuracy", "test accuracy"), Metric("agreement", "agreement with teacher"))
    assert ", 4 refused (site-0: app, site-1: budget, site-2: policy and 1 more) |" in progress_line(record, config, metrics)

