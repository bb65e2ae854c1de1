"""A site's round without Flower's processes: the ledger decides, the reply says why."""

import shlex

import pytest
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

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


def test_sites_hold_disjoint_private_data_that_covers_the_private_part(small_config):
    load_site.cache_clear()
    overrides = shlex.join(small_config.overrides)
    sites = [load_site(overrides, i, small_config.sites, None) for i in range(small_config.sites)]
    rows = [tuple(x.flatten().tolist()) for site in sites for x in site.data.tensors[0]]
    private = sites[0].task._parts["private"].tensors[0]
    assert len(rows) == len(private)
    assert set(rows) == {tuple(x.flatten().tolist()) for x in private}


def test_a_malformed_request_is_refused_before_any_budget_is_spent(site):
    bad = RecordDict({P.ARRAYS: ArrayRecord({"net.1.weight": Array(np.zeros((3, 3), dtype=np.float32))})})
    reply = train_round(site, bad, RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_REFUSED
    assert "malformed" in reply[P.CONFIG][P.REASON]
    assert not (site.ledger_dir / LEDGER_FILE).exists()


@pytest.fixture
def logits_site(small_config, tmp_path):
    load_site.cache_clear()
    overrides = small_config.overrides + ["exchange=logits", "exchange.compression=topk", "exchange.topk=2"]
    return load_site(shlex.join(overrides), 1, small_config.sites, str(tmp_path / "ledger-logits"))


def _logits_request(site, **manifest_changes):
    manifest = {**P.public_manifest(site.task.public_inputs()), **manifest_changes}
    content = _global(site)
    content[P.CONFIG] = ConfigRecord(manifest)
    return content


def test_a_site_with_another_public_set_refuses_before_spending_budget(logits_site):
    reply = train_round(logits_site, _logits_request(logits_site, **{P.PUBLIC_SHA256: "0" * 64}),
                        RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_REFUSED
    assert "does not match" in reply[P.CONFIG][P.REASON]
    assert not (logits_site.ledger_dir / LEDGER_FILE).exists()


def test_logits_mode_sends_compressed_public_logits_and_never_weights(logits_site):
    reply = train_round(logits_site, _logits_request(logits_site), RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK
    assert P.ARRAYS not in reply.array_records
    rows = len(logits_site.task.public_inputs())
    assert {k: tuple(v.shape) for k, v in reply[P.LOGITS].items()} == {"values": (rows, 2), "indices": (rows, 2), "logsumexp": (rows,)}


def test_broadcast_logits_keeps_each_sites_own_student_of_its_own_shape(small_config, tmp_path):
    load_site.cache_clear()
    overrides = shlex.join(small_config.overrides + [
        "exchange=logits", "exchange.broadcast=logits", "exchange.site_students=[[8],[16,4]]"])
    site = load_site(overrides, 1, small_config.sites, str(tmp_path / "ledger-own"))
    request = RecordDict({P.CONFIG: ConfigRecord(P.public_manifest(site.task.public_inputs()))})
    state = RecordDict()
    first = train_round(site, request, state, server_round=1, run="t")
    assert first[P.CONFIG][P.STATUS] == P.STATUS_OK
    kept = state[P.STUDENT_STATE]
    assert [tuple(v.shape) for v in kept.values()] == [(16, 64), (16,), (4, 16), (4,), (10, 4), (10,)]
    rows = len(site.task.public_inputs())
    request[P.CONSENSUS] = ArrayRecord({P.LOGITS: Array(np.zeros((rows, 10), dtype=np.float32))})
    train_round(site, request, state, server_round=2, run="t")
    assert not np.allclose(state[P.STUDENT_STATE]["net.1.weight"].numpy(), kept["net.1.weight"].numpy())
