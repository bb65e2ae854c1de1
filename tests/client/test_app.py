"""A site's round without Flower's processes: the ledger decides, the reply says why."""

import json
import shlex

import pytest
import torch
from flwr.app import RecordDict

from client.app import load_site, train_round
from common import payload as P
from common.privacy import LEDGER_FILE, PrivacyLedger


@pytest.fixture
def site(small_config, tmp_path):
    load_site.cache_clear()
    return load_site(shlex.join(small_config.overrides), 0, small_config.sites, str(tmp_path / "ledger"))


def _global(site):
    torch.manual_seed(0)
    return RecordDict({P.ARRAYS: P.model_to_record(site.task.student(site.config.student))})


def test_a_round_trains_reserves_in_the_ledger_and_reports_epsilon(site):
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK
    ledger = PrivacyLedger(site.ledger_dir, delta=site.config.privacy.delta)
    assert len(ledger.entries) == 1 and ledger.entries[0].round == 1
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(ledger.epsilon_spent())
    assert 0 < ledger.epsilon_spent() < site.config.privacy.epsilon
    assert reply[P.METRICS][P.NUM_EXAMPLES] == len(site.data)


def test_a_site_whose_budget_is_spent_refuses(site):
    for rnd in (1, 2):  # the run's two rounds spend the whole budget
        assert train_round(site, _global(site), RecordDict(), server_round=rnd, run="first")[P.CONFIG][P.STATUS] == P.STATUS_OK
    spent = PrivacyLedger(site.ledger_dir, delta=site.config.privacy.delta).epsilon_spent()
    assert spent == pytest.approx(site.config.privacy.epsilon, rel=0.02)
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="second")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_REFUSED
    assert "budget" in reply[P.CONFIG][P.REASON]
    assert P.ARRAYS not in reply.array_records
    assert len(PrivacyLedger(site.ledger_dir, delta=site.config.privacy.delta).entries) == 2


def test_a_corrupt_ledger_makes_the_site_refuse_and_stays_as_it_was(site):
    site.ledger_dir.mkdir(parents=True, exist_ok=True)
    (site.ledger_dir / LEDGER_FILE).write_text('{"format": "fedistill-privacy-ledger", "version": 1, "entr')
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_REFUSED
    assert "corrupt" in reply[P.CONFIG][P.REASON]
    assert (site.ledger_dir / LEDGER_FILE).read_text().endswith('"entr')


def test_sites_hold_disjoint_private_data(small_config):
    load_site.cache_clear()
    overrides = shlex.join(small_config.overrides)
    sizes = [len(load_site(overrides, i, small_config.sites, None).data) for i in range(small_config.sites)]
    assert sum(sizes) == len(load_site(overrides, 0, 3, None).task._parts["private"])
