import json
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.accounting import ORDERS, _rdp_per_step, epsilon_of
from common.privacy import (LEDGER_FILE, Budget, BudgetExhausted, DataFingerprint, LedgerError, PrivacyLedger,
                            RoundAlreadyTrained, RoundLimit)

DELTA = 1e-5
DATA = DataFingerprint(dataset="digits abc", partition="seed 0, 3 sites", records="r0")


def _ledger(path, epsilon=3.0, data=DATA, delta=DELTA):
    return PrivacyLedger(path, budget=Budget(epsilon, delta), data=data)


def _reserve(ledger, *, sigma=1.5, steps=50, run="r", rnd=1, limit=None):
    return ledger.reserve(limit=limit or ledger.budget, noise_multiplier=sigma, sample_rate=0.1, steps=steps,
                          run=run, round=rnd)


def test_epsilon_equals_opacus_rdp_accountant():
    blocks = [(1.1, 0.1, 40), (2.5, 0.05, 300)]
    accountant = RDPAccountant()
    accountant.history = list(blocks)
    assert epsilon_of(blocks, delta=DELTA) == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)


@pytest.mark.parametrize("sigma, rate", [(0.5, 0.25), (1.0, 0.1), (0.8, 0.01), (3.0, 0.05), (50.0, 1e-4),
                                         (0.3, 0.9), (1.7, 0.999), (1.0, 1.0), (0.0, 0.1), (2.0, 0.0)])
def test_the_rdp_of_a_step_is_opacus_compute_rdp_to_the_bit(sigma, rate):
    """The terms are computed in blocks, but summed as Opacus sums them: the same floats, not close ones."""
    expected = rdp_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=ORDERS)
    assert np.array_equal(_rdp_per_step(sigma, rate), expected)


@pytest.mark.parametrize("budget, rate, steps", [(1.0, 1 / 8, 80), (3.0, 1 / 10, 100), (8.0, 0.05, 400)])
def test_calibrated_noise_spends_at_most_the_budget_and_close_to_it(tmp_path, budget, rate, steps):
    ledger = _ledger(tmp_path / "s", epsilon=budget)
    sigma = ledger.calibrate(limit=ledger.budget, sample_rate=rate, steps=steps, max_noise_multiplier=50)
    spent = epsilon_of([(sigma, rate, steps)], delta=DELTA)
    assert 0.97 * budget <= spent <= budget
    # and a little less noise would break the budget: the calibration is tight
    assert epsilon_of([(0.97 * sigma, rate, steps)], delta=DELTA) > budget


def test_a_run_asking_for_less_than_the_site_allows_is_held_to_its_own_limit(tmp_path):
    ledger = _ledger(tmp_path / "s", epsilon=8.0)
    limit = Budget(2.0, 1e-6)  # smaller epsilon and smaller delta than the site's
    sigma = ledger.calibrate(limit=limit, sample_rate=0.1, steps=100, max_noise_multiplier=50)
    _reserve(ledger, sigma=sigma, steps=100, limit=limit)
    assert 0.97 * 2.0 <= ledger.epsilon_spent(1e-6) <= 2.0
    assert ledger.epsilon_spent() < 2.0  # at the site's larger delta, less


def test_ledger_accumulates_across_processes_and_runs(tmp_path):
    first = _ledger(tmp_path / "s", epsilon=5)
    _reserve(first, run="run-1")
    second = _ledger(tmp_path / "s", epsilon=5)  # a new process reads the same disk
    assert second.epsilon_spent() == pytest.approx(first.epsilon_spent())
    _reserve(second, run="run-2")
    assert _ledger(tmp_path / "s", epsilon=5).epsilon_spent() == pytest.approx(epsilon_of([(1.5, 0.1, 100)], delta=DELTA))
    assert [e.run for e in _ledger(tmp_path / "s", epsilon=5).entries] == ["run-1", "run-2"]


def test_reserve_refuses_past_the_budget_and_records_nothing(tmp_path):
    ledger = _ledger(tmp_path / "s")
    _reserve(ledger, sigma=2.0, steps=60)
    before = (tmp_path / "s" / LEDGER_FILE).read_text()
    with pytest.raises(BudgetExhausted, match="over the limit"):
        _reserve(ledger, sigma=2.0, steps=5000, rnd=2)
    assert (tmp_path / "s" / LEDGER_FILE).read_text() == before


def test_a_budget_cannot_be_changed_once_spending_has_started(tmp_path):
    _reserve(_ledger(tmp_path / "s", epsilon=1.0), sigma=3.0, steps=10)
    with pytest.raises(LedgerError, match="set site.epsilon=1.0"):
        _ledger(tmp_path / "s", epsilon=5.0)
    assert len(_ledger(tmp_path / "s", epsilon=1.0).entries) == 1


def test_calibrate_refuses_when_the_budget_is_spent(tmp_path):
    ledger = _ledger(tmp_path / "s", epsilon=1.0)
    sigma = ledger.calibrate(limit=ledger.budget, sample_rate=0.1, steps=100, max_noise_multiplier=20)
    _reserve(ledger, sigma=sigma, steps=100)
    with pytest.raises(BudgetExhausted):
        _ledger(tmp_path / "s", epsilon=1.0).calibrate(limit=Budget(1.0, DELTA), sample_rate=0.1, steps=100,
                                                  max_noise_multiplier=20)


def test_calibration_against_what_remains_keeps_the_total_within_budget(tmp_path):
    ledger = _ledger(tmp_path / "s")
    for rnd in range(1, 5):  # 4 rounds of 20 steps, calibrated each round against the rounds left
        sigma = ledger.calibrate(limit=ledger.budget, sample_rate=0.1, steps=20 * (5 - rnd), max_noise_multiplier=50)
        _reserve(ledger, sigma=sigma, steps=20, rnd=rnd)
    assert 0.99 * 3.0 <= ledger.epsilon_spent() <= 3.0


def test_a_release_without_dp_makes_epsilon_infinite_and_refuses_every_later_dp_claim(tmp_path):
    ledger = _ledger(tmp_path / "s")
    _reserve(ledger, sigma=4.0, steps=10)
    ledger.admit_round(run="baseline", round=1, most_rounds=1, sample_rate=0.1, steps=30, limit=None)
    reread = _ledger(tmp_path / "s")  # recorded on disk, not only in memory
    assert math.isinf(reread.epsilon_spent())
    for attempt in (
        lambda: reread.calibrate(limit=reread.budget, sample_rate=0.1, steps=10, max_noise_multiplier=50),
        lambda: _reserve(reread, sigma=50.0, steps=1, run="later"),
    ):
        with pytest.raises(BudgetExhausted, match="released without DP"):
            attempt()
    assert [e.dp for e in _ledger(tmp_path / "s").entries] == [True, False]


def test_a_ledger_refuses_other_records(tmp_path):
    _reserve(_ledger(tmp_path / "site-0"))
    other = DataFingerprint(dataset=DATA.dataset, partition=DATA.partition, records="r-other")
    with pytest.raises(LedgerError, match="covers other records"):
        _ledger(tmp_path / "site-0", data=other)


def test_a_new_ledger_refuses_the_same_data_set_under_another_partition(tmp_path):
    _reserve(_ledger(tmp_path / "site-0"))
    same_partition = DataFingerprint(dataset=DATA.dataset, partition=DATA.partition, records="r1")
    _reserve(_ledger(tmp_path / "site-1", data=same_partition))  # a sibling of the same partition is fine
    repartitioned = DataFingerprint(dataset=DATA.dataset, partition="seed 0, 4 sites", records="r3")
    with pytest.raises(LedgerError, match="under another partition"):
        _ledger(tmp_path / "site-3", data=repartitioned)
    assert not (tmp_path / "site-3" / LEDGER_FILE).exists()
    unrelated = DataFingerprint(dataset="mnist xyz", partition="seed 0, 4 sites", records="r9")
    _ledger(tmp_path / "site-9", data=unrelated)  # another data set may share the folder


def test_a_new_ledger_refuses_records_another_ledger_already_charges(tmp_path):
    _reserve(_ledger(tmp_path / "site-0"))
    with pytest.raises(LedgerError, match="already charges these very records"):
        _ledger(tmp_path / "site-1")


def test_records_declared_held_by_k_sites_get_k_ledgers_and_no_more(tmp_path):
    shared = DataFingerprint(dataset=DATA.dataset, partition=DATA.partition, records="r0", copies=3)
    for site in range(3):
        _reserve(_ledger(tmp_path / f"site-{site}", data=shared))
    with pytest.raises(LedgerError, match="already charges these very records"):
        _ledger(tmp_path / "site-3", data=shared)
    # The same records declared held by fewer sites, or under no declaration, get no further ledger.
    for other in (DataFingerprint(**{**shared.__dict__, "copies": 4}), DATA):
        with pytest.raises(LedgerError, match="already charges these very records"):
            _ledger(tmp_path / "site-4", data=other)


def test_a_ledger_whose_copies_is_not_a_count_is_refused(tmp_path):
    _reserve(_ledger(tmp_path / "s"))
    doc = json.loads((tmp_path / "s" / LEDGER_FILE).read_text())
    for bad in (0, "3", 2.0, None):
        doc["data"]["copies"] = bad
        (tmp_path / "s" / LEDGER_FILE).write_text(json.dumps(doc))
        with pytest.raises(LedgerError, match="unreadable or corrupt"):
            _ledger(tmp_path / "s")


def _doc(**changes):
    doc = {"format": "fedistill-privacy-ledger", "version": 2, "accountant": "rdp", "delta": DELTA, "budget": 3.0,
           "data": {"dataset": DATA.dataset, "partition": DATA.partition, "records": DATA.records},
           "entries": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5, "run": "r", "round": 1, "time": 0}]}
    return json.dumps({**doc, **changes})


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "unreadable or corrupt"),
        ("", "unreadable or corrupt"),
        (json.dumps({"format": "something-else", "version": 2}), "not a version-2"),
        (_doc(version=1), "not a version-2"),
        (_doc(delta=1e-6), "set site.delta=1e-06"),
        (_doc(entries=[{"steps": 1}]), "unreadable or corrupt"),
        (_doc(data={"dataset": "x"}), "unreadable or corrupt"),
        (_doc(entries=[{"noise_multiplier": -1, "sample_rate": 0.1, "steps": 5, "run": "r", "round": 1, "time": 0}]),
         "impossible entry"),
    ],
)
def test_a_corrupt_ledger_is_refused_never_reset(tmp_path, content, match):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / LEDGER_FILE).write_text(content)
    with pytest.raises(LedgerError, match=match):
        _ledger(tmp_path / "s")
    assert (tmp_path / "s" / LEDGER_FILE).read_text() == content


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    _reserve(_ledger(tmp_path / "s"), sigma=2.0, steps=10)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [LEDGER_FILE]
    doc = json.loads((tmp_path / "s" / LEDGER_FILE).read_text())
    assert doc["entries"][0]["steps"] == 10 and doc["data"]["records"] == DATA.records


def test_a_noisy_count_is_charged_once_as_a_gaussian_mechanism_and_then_reused(tmp_path):
    ledger = _ledger(tmp_path / "s")
    first = ledger.release_noisy_count(limit=ledger.budget, count=500, noise=10.0, run="a", round=1)
    assert abs(first - 500) < 80  # 8 standard deviations
    assert ledger.epsilon_spent() == pytest.approx(epsilon_of([(10.0, 1.0, 1)], delta=DELTA))
    again = _ledger(tmp_path / "s").release_noisy_count(limit=ledger.budget, count=500, noise=10.0, run="b", round=1)
    assert again == first and len(_ledger(tmp_path / "s").entries) == 1  # post-processing: free


def test_a_noisy_count_beyond_the_limit_is_refused_and_not_recorded(tmp_path):
    ledger = _ledger(tmp_path / "s", epsilon=0.5)
    with pytest.raises(BudgetExhausted, match="noisy record count"):
        ledger.release_noisy_count(limit=ledger.budget, count=500, noise=0.5, run="a", round=1)
    assert not (tmp_path / "s" / LEDGER_FILE).exists()


def test_two_new_ledgers_cannot_both_pass_the_partition_check(tmp_path):
    repartitioned = DataFingerprint(dataset=DATA.dataset, partition="seed 0, 4 sites", records="r3")
    late = _ledger(tmp_path / "site-3", data=repartitioned)  # opened while it has no siblings yet
    _reserve(_ledger(tmp_path / "site-0"))  # meanwhile another partition starts charging
    with pytest.raises(LedgerError, match="under another partition"):
        _reserve(late)
    assert not (tmp_path / "site-3" / LEDGER_FILE).exists()


def test_admitting_a_round_refuses_a_replay_and_a_run_past_its_rounds_and_records_nothing(tmp_path):
    ledger = _ledger(tmp_path / "s")
    admit = dict(most_rounds=2, sample_rate=0.1, steps=10, limit=ledger.budget, planned_steps=20,
                 max_noise_multiplier=50)
    noise = ledger.admit_round(run="r", round=1, **admit)
    assert noise > 0 and [(e.run, e.round, e.noise_multiplier) for e in ledger.entries] == [("r", 1, noise)]
    with pytest.raises(RoundAlreadyTrained):
        ledger.admit_round(run="r", round=1, **admit)
    ledger.admit_round(run="r", round=2, **{**admit, "planned_steps": 10})
    with pytest.raises(RoundLimit):
        ledger.admit_round(run="r", round=3, **admit)
    assert len(_ledger(tmp_path / "s").entries) == 2


def test_a_runs_own_spend_leaves_out_the_other_runs(tmp_path):
    ledger = _ledger(tmp_path / "s")
    _reserve(ledger, sigma=2.0, steps=50, run="a")
    _reserve(ledger, sigma=2.0, steps=50, run="b")
    assert ledger.epsilon_of_run("a", 1e-5) == pytest.approx(ledger.epsilon_of_run("b", 1e-5))
    assert ledger.epsilon_of_run("a", 1e-5) < ledger.epsilon_spent() and ledger.epsilon_of_run("c", 1e-5) == 0.0
