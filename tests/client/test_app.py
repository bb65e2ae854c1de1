"""The ClientApp's answer to a message: the request is data, the policy rules, the reply is held."""

import json

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

import client.app as client_app
from client.app import answer, hold_reply
from common import payload as P
from common.config import load_config
from common.monitoring import read_activity
from common.policy import POLICY_ENV, policy_from
from common.privacy import LEDGER_FILE
from common.request import RequestError, encode, request_of


def _context(partition=0, sites=3, run_config=None):
    node = {"partition-id": partition, "num-partitions": sites}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config=run_config or {})


def _message(request: str, server_round=1) -> RecordDict:
    return RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: server_round, P.REQUEST: request})})


@pytest.fixture
def site_file(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "site.yaml"
    path.write_text(f"ledger_dir: {tmp_path / 'ledgers'}\ncache_dir: {cache_dir}\ntask_sources: [digits]\n")
    monkeypatch.setenv(POLICY_ENV, str(path))
    monkeypatch.setenv("SITE_SECRET", "s3cr3t-of-the-site")
    return path


@pytest.mark.parametrize(
    "request_override, reason",
    [
        ("privacy=none", "site.require_dp"),
        ("privacy.epsilon=8", "site.epsilon"),
        ("privacy.delta=1e-4", "site.delta"),
        ("task=mnist", "site.task_sources"),
        ("rounds=500", "site.max_rounds"),
    ],
)
def test_a_request_outside_the_sites_policy_is_refused_before_anything_is_loaded(
        small_config, site_file, tmp_path, monkeypatch, request_override, reason):
    monkeypatch.setattr(client_app, "load_site", lambda *a: pytest.fail("the site was built"))
    request = encode(request_of(load_config(small_config.overrides + [request_override])))
    reply = answer(_message(request), _context())
    assert (reply[P.CONFIG][P.STATUS], reply[P.CONFIG][P.CODE]) == (P.STATUS_REFUSED, P.REFUSAL_POLICY)
    assert reason in reply[P.CONFIG][P.REASON]
    site_dir = tmp_path / "ledgers" / "site-0"
    assert not (site_dir / LEDGER_FILE).exists()  # nothing reserved
    assert [a["code"] for a in read_activity(site_dir)] == [P.REFUSAL_POLICY]  # the site's metrics count it


def _tampered(small_config, key, value) -> str:
    document = json.loads(encode(request_of(load_config(small_config.overrides))))
    document[key] = value
    return json.dumps(document)


@pytest.mark.parametrize("key, value", [
    ("ledger_dir", "/tmp/elsewhere"), ("task", "${oc.env:SITE_SECRET}"), ("source", "${oc.env:SITE_SECRET}"),
    ("task", "../site"), ("hydra", {"searchpath": ["file:///root"]}), ("rounds", "${oc.env:SITE_SECRET}"),
])
def test_a_request_outside_the_schema_gets_one_fixed_reason(small_config, site_file, tmp_path, key, value):
    reply = answer(_message(_tampered(small_config, key, value)), _context())
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST
    assert reply[P.CONFIG][P.REASON] == RequestError.REASON
    assert str(tmp_path) not in str(reply) and "s3cr3t" not in str(reply)


@pytest.mark.parametrize("request_text", ["", "'unbalanced", "task=digits", '{"version": 1}', None])
def test_anything_but_a_request_document_is_refused(site_file, request_text):
    content = RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1, **({} if request_text is None
                                                                         else {P.REQUEST: request_text})})})
    reply = answer(content, _context())
    assert (reply[P.CONFIG][P.CODE], reply[P.CONFIG][P.REASON]) == (P.REFUSAL_BAD_REQUEST, RequestError.REASON)


def test_the_run_config_is_not_read(small_config, site_file, tmp_path, cache_dir):
    """Flower's run config reaches the ClientApp too: a site ignores it (the ServerApp reads it)."""
    request = encode(request_of(load_config(small_config.overrides)))
    hostile = {"overrides": "task.source=${oc.env:SITE_SECRET} run_dir=/ cache_dir=/tmp/other"}
    reply = answer(_message(request, server_round=3), _context(run_config=hostile))
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST  # round 3 of a 2-round run: the request was read
    assert "s3cr3t" not in str(reply) and not (tmp_path / "other").exists()


def test_a_site_error_sends_a_code_and_keeps_the_details(small_config, tmp_path, monkeypatch):
    monkeypatch.setenv(POLICY_ENV, str(tmp_path / "missing-policy.yaml"))
    reply = answer(_message(encode(request_of(load_config(small_config.overrides)))), _context())
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_SITE_ERROR
    assert "missing-policy" not in str(reply[P.CONFIG])


class Clock:
    def __init__(self, now):
        self.now, self.slept = now, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)


def test_a_site_with_its_own_records_holds_every_reply_until_its_bound(tmp_path):
    own = policy_from({"data_path": str(tmp_path / "records.npz"), "reply_after_s": 30})
    clock = Clock(now=112.5)
    hold_reply(own, started=100.0, name="site-a", clock=clock, sleep=clock.sleep)
    assert clock.slept == [17.5]
    built_in = policy_from({"reply_after_s": 30})  # the built-in partition is public data: nothing to hide
    hold_reply(built_in, started=100.0, name="site-0", clock=clock, sleep=clock.sleep)
    assert clock.slept == [17.5]


def test_a_round_that_overran_the_bound_is_said_in_the_sites_log(tmp_path, caplog):
    own = policy_from({"data_path": str(tmp_path / "records.npz"), "reply_after_s": 10})
    clock = Clock(now=125.0)
    with caplog.at_level("WARNING"):
        hold_reply(own, started=100.0, name="site-a", clock=clock, sleep=clock.sleep)
    assert clock.slept == [] and "more than reply_after_s=10" in caplog.text
