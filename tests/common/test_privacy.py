import json

import pytest
from opacus.accountants import RDPAccountant

from common.privacy import LEDGER_FILE, BudgetExhausted, LedgerError, PrivacyLedger, epsilon_of

DELTA = 1e-5


def test_epsilon_equals_opacus_rdp_accountant():
    blocks = [(1.1, 0.1, 40), (2.5, 0.05, 300)]
    accountant = RDPAccountant()
    accountant.history = list(blocks)
    assert epsilon_of(blocks, delta=DELTA) == pytest.approx(accountant.get_epsilon(delta=DELTA), rel=1e-9)


@pytest.mark.parametrize("budget, rate, steps", [(1.0, 1 / 8, 80), (3.0, 1 / 10, 100), (8.0, 0.05, 400)])
def test_calibrated_noise_spends_at_most_the_budget_and_close_to_it(tmp_path, budget, rate, steps):
    ledger = PrivacyLedger(tmp_path, delta=DELTA)
    sigma = ledger.calibrate(budget=budget, sample_rate=rate, steps=steps, max_noise_multiplier=50)
    spent = ledger.epsilon_after(noise_multiplier=sigma, sample_rate=rate, steps=steps)
    assert spent <= budget
    assert spent >= 0.97 * budget
    # and a little less noise would break the budget: the calibration is tight
    assert ledger.epsilon_after(noise_multiplier=0.97 * sigma, sample_rate=rate, steps=steps) > budget


def test_ledger_accumulates_across_processes_and_runs(tmp_path):
    first = PrivacyLedger(tmp_path, delta=DELTA)
    first.reserve(budget=5, noise_multiplier=1.5, sample_rate=0.1, steps=50, run="run-1", round=1)
    after_one = first.epsilon_spent()
    second = PrivacyLedger(tmp_path, delta=DELTA)  # a new process reads the same disk
    assert second.epsilon_spent() == pytest.approx(after_one)
    second.reserve(budget=5, noise_multiplier=1.5, sample_rate=0.1, steps=50, run="run-2", round=1)
    assert PrivacyLedger(tmp_path, delta=DELTA).epsilon_spent() == pytest.approx(
        epsilon_of([(1.5, 0.1, 100)], delta=DELTA)
    )
    assert [e.run for e in PrivacyLedger(tmp_path, delta=DELTA).entries] == ["run-1", "run-2"]


def test_reserve_refuses_past_the_budget_and_records_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path, delta=DELTA)
    ledger.reserve(budget=3, noise_multiplier=2.0, sample_rate=0.1, steps=60, run="r", round=1)
    before = (tmp_path / LEDGER_FILE).read_text()
    with pytest.raises(BudgetExhausted, match="over the budget"):
        ledger.reserve(budget=3, noise_multiplier=2.0, sample_rate=0.1, steps=5000, run="r", round=2)
    assert (tmp_path / LEDGER_FILE).read_text() == before


def test_a_budget_cannot_be_raised_once_spending_has_started(tmp_path):
    PrivacyLedger(tmp_path, delta=DELTA).reserve(budget=1.0, noise_multiplier=3.0, sample_rate=0.1, steps=10, run="a", round=1)
    ledger = PrivacyLedger(tmp_path, delta=DELTA)
    for attempt in (
        lambda: ledger.calibrate(budget=5.0, sample_rate=0.1, steps=10, max_noise_multiplier=20),
        lambda: ledger.reserve(budget=5.0, noise_multiplier=3.0, sample_rate=0.1, steps=10, run="b", round=1),
    ):
        with pytest.raises(LedgerError, match="set privacy.epsilon=1"):
            attempt()
    assert len(PrivacyLedger(tmp_path, delta=DELTA).entries) == 1


def test_calibrate_refuses_when_the_budget_is_spent(tmp_path):
    ledger = PrivacyLedger(tmp_path, delta=DELTA)
    sigma = ledger.calibrate(budget=1.0, sample_rate=0.1, steps=100, max_noise_multiplier=20)
    ledger.reserve(budget=1.0, noise_multiplier=sigma, sample_rate=0.1, steps=100, run="r", round=1)
    with pytest.raises(BudgetExhausted):
        PrivacyLedger(tmp_path, delta=DELTA).calibrate(budget=1.0, sample_rate=0.1, steps=100, max_noise_multiplier=20)


def test_calibration_against_what_remains_keeps_the_total_within_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path, delta=DELTA)
    for rnd in range(1, 5):  # 4 rounds of 20 steps, calibrated each round against the rounds left
        sigma = ledger.calibrate(budget=3.0, sample_rate=0.1, steps=20 * (5 - rnd), max_noise_multiplier=50)
        ledger.reserve(budget=3.0, noise_multiplier=sigma, sample_rate=0.1, steps=20, run="r", round=rnd)
    assert 0.95 * 3.0 <= ledger.epsilon_spent() <= 3.0


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "unreadable or corrupt"),
        ("", "unreadable or corrupt"),
        (json.dumps({"format": "something-else", "version": 1}), "not a version-1"),
        (json.dumps({"format": "fedistill-privacy-ledger", "version": 1, "accountant": "rdp", "delta": 1e-6, "entries": []}), "set privacy.delta=1e-06"),
        (json.dumps({"format": "fedistill-privacy-ledger", "version": 1, "accountant": "rdp", "delta": DELTA, "entries": [{"steps": 1}]}), "unreadable or corrupt"),
        (json.dumps({"format": "fedistill-privacy-ledger", "version": 1, "accountant": "rdp", "delta": DELTA, "budget": 3,
                     "entries": [{"noise_multiplier": -1, "sample_rate": 0.1, "steps": 5, "run": "r", "round": 1, "time": 0}]}), "impossible entry"),
    ],
)
def test_a_corrupt_ledger_is_refused_never_reset(tmp_path, content, match):
    (tmp_path / LEDGER_FILE).write_text(content)
    with pytest.raises(LedgerError, match=match):
        PrivacyLedger(tmp_path, delta=DELTA)
    assert (tmp_path / LEDGER_FILE).read_text() == content


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    ledger = PrivacyLedger(tmp_path, delta=DELTA)
    ledger.reserve(budget=5, noise_multiplier=2.0, sample_rate=0.1, steps=10, run="r", round=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILE, LEDGER_FILE + ".lock"]
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["entries"][0]["steps"] == 10
