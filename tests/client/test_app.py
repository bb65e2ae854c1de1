"""A site's round without Flower's processes: the policy and the ledger decide, the reply says why."""

import math
import shlex

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

import client.app as client_app
from client.app import answer, load_site, starting_student, train_round
from common import payload as P
from common.config import ConfigError
from common.monitoring import read_activity
from common.policy import POLICY_ENV, policy_from
from common.privacy import LEDGER_FILE
from server.strategy import for_site


@pytest.fixture
def policy(tmp_path, cache_dir):
    return policy_from({"ledger_dir": str(tmp_path / "ledgers"), "cache_dir": cache_dir})


@pytest.fixture
def site(small_config, policy):
    load_site.cache_clear()
    return load_site(shlex.join(small_config.overrides), 0, small_config.sites, policy)


def _global(site, rounds_left=None, **asset_changes):
    """Round 1's request as the server sends it: the global student and the announced assets."""
    torch.manual_seed(0)
    content = RecordDict({P.ARRAYS: P.model_to_record(site.task.student(site.config.student)),
                          P.CONFIG: ConfigRecord({**site.assets, **asset_changes, P.SERVER_ROUND: 1})})
    return content if rounds_left is None else for_site(content, rounds_left)


def _entries(site):
    return site.ledger().entries


def test_a_dp_round_reserves_in_the_ledger_and_replies_only_what_may_leave_the_site(site):
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK
    [entry] = _entries(site)
    assert entry.round == 1 and entry.dp and entry.steps == reply[P.METRICS][P.DP_STEPS]
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(site.ledger().epsilon_spent())
    assert 0 < reply[P.METRICS][P.EPSILON_SPENT] < site.config.privacy.epsilon
    # no record count, no loss, no timing: exactly the items the privacy report lists
    assert P.reply_items(reply) == {P.ARRAYS, "config/status", "config/site", "metrics/epsilon-spent",
                                    "metrics/epsilon-budget", "metrics/noise-multiplier", "metrics/dp-steps"}
    assert P.reply_items(reply) <= set(P.released_items(mode="weights", weighting="uniform", dp=True))


def test_the_ledger_holds_the_round_before_training_starts(site, monkeypatch):
    seen = []

    def training_that_fails(*args, **kwargs):
        seen.append([e.round for e in site.ledger().entries])  # read from disk, as another process would
        raise RuntimeError("the machine lost power")

    monkeypatch.setattr(client_app, "distill_locally", training_that_fails)
    with pytest.raises(RuntimeError):
        train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert seen == [[1]]


def test_noise_is_calibrated_for_the_rounds_the_site_has_left(site):
    # told this is its only round of two, the site spends its whole budget now
    reply = train_round(site, _global(site, rounds_left=1), RecordDict(), server_round=1, run="t")
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(site.config.privacy.epsilon, rel=1e-3)
    assert reply[P.METRICS][P.EPSILON_SPENT] <= site.config.privacy.epsilon


def test_a_site_whose_budget_is_spent_refuses(site):
    for rnd in (1, 2):  # the run's two rounds spend the whole budget
        assert train_round(site, _global(site), RecordDict(), server_round=rnd, run="first")[P.CONFIG][P.STATUS] == P.STATUS_OK
    assert site.ledger().epsilon_spent() == pytest.approx(site.config.privacy.epsilon, rel=1e-3)
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="second")
    assert (reply[P.CONFIG][P.STATUS], reply[P.CONFIG][P.CODE]) == (P.STATUS_REFUSED, P.REFUSAL_BUDGET)
    assert P.ARRAYS not in reply.array_records
    assert len(_entries(site)) == 2


def test_a_corrupt_ledger_makes_the_site_refuse_without_sending_its_path(site):
    site.ledger_dir.mkdir(parents=True, exist_ok=True)
    (site.ledger_dir / LEDGER_FILE).write_text('{"format": "fedistill-privacy-ledger", "version": 2, "entr')
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_LEDGER
    assert str(site.ledger_dir) not in str(reply[P.CONFIG]) and "/" not in reply[P.CONFIG][P.REASON]
    assert (site.ledger_dir / LEDGER_FILE).read_text().endswith('"entr')


def test_sites_hold_disjoint_private_data_that_covers_the_private_part(small_config, policy):
    load_site.cache_clear()
    overrides = shlex.join(small_config.overrides)
    sites = [load_site(overrides, i, small_config.sites, policy) for i in range(small_config.sites)]
    rows = [tuple(x.flatten().tolist()) for site in sites for x in site.data.tensors[0]]
    private = sites[0].task._parts["private"].tensors[0]
    assert len(rows) == len(private)
    assert set(rows) == {tuple(x.flatten().tolist()) for x in private}


@pytest.mark.parametrize("corrupt", ["shape", "nan", "inf", "huge"])
def test_a_malformed_request_is_refused_before_any_budget_is_spent(site, corrupt):
    request = _global(site)
    arrays = {k: v.numpy().copy() for k, v in request[P.ARRAYS].items()}
    if corrupt == "shape":
        arrays["net.1.weight"] = np.zeros((3, 3), dtype=np.float32)
    else:
        arrays["net.1.weight"][0, 0] = {"nan": np.nan, "inf": np.inf, "huge": 1e9}[corrupt]
    request[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    reply = train_round(site, request, RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST
    assert not (site.ledger_dir / LEDGER_FILE).exists()


@pytest.mark.parametrize("server_round, rounds_left", [(3, 1), (1, 3), (2, 0)])
def test_impossible_round_numbers_are_refused_before_any_budget_is_spent(site, server_round, rounds_left):
    reply = train_round(site, _global(site, rounds_left), RecordDict(), server_round=server_round, run="t")
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST
    assert not (site.ledger_dir / LEDGER_FILE).exists()


def _context(overrides, partition=0, sites=3, node_config=None):
    node = {"partition-id": partition, "num-partitions": sites, **(node_config or {})}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={"overrides": overrides})


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
        small_config, tmp_path, monkeypatch, request_override, reason):
    load_site.cache_clear()
    policy_file = tmp_path / "site.yaml"
    policy_file.write_text(f"ledger_dir: {tmp_path / 'ledgers'}\ntask_sources: [digits]\n")
    monkeypatch.setenv(POLICY_ENV, str(policy_file))
    request = shlex.join(small_config.overrides + [request_override])
    reply = answer(RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}), _context(request))
    assert (reply[P.CONFIG][P.STATUS], reply[P.CONFIG][P.CODE]) == (P.STATUS_REFUSED, P.REFUSAL_POLICY)
    assert reason in reply[P.CONFIG][P.REASON]
    site_dir = tmp_path / "ledgers" / "site-0"
    assert not (site_dir / LEDGER_FILE).exists()  # nothing reserved
    assert [a["code"] for a in read_activity(site_dir)] == [P.REFUSAL_POLICY]  # the site's metrics count it


@pytest.mark.parametrize("request_override", ["privacy.ledger_dir=/tmp/elsewhere", "task.name=${oc.env:HOME}",
                                              "hydra.searchpath=[file:///root]", "task=../site", "'unbalanced"])
def test_a_request_cannot_move_the_ledger_or_read_the_sites_environment(small_config, tmp_path, monkeypatch,
                                                                         request_override):
    load_site.cache_clear()
    monkeypatch.setenv(POLICY_ENV, str(tmp_path / "site.yaml"))
    (tmp_path / "site.yaml").write_text(f"ledger_dir: {tmp_path / 'ledgers'}\n")
    request = shlex.join(small_config.overrides + [request_override])
    reply = answer(RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}), _context(request))
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST
    assert str(tmp_path) not in str(reply[P.CONFIG]) and "/root" not in str(reply[P.CONFIG])


def test_a_site_error_sends_a_code_and_keeps_the_details(small_config, tmp_path, monkeypatch):
    load_site.cache_clear()
    monkeypatch.setenv(POLICY_ENV, str(tmp_path / "missing-policy.yaml"))
    reply = answer(RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}), _context(shlex.join(small_config.overrides)))
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_SITE_ERROR
    assert "missing-policy" not in str(reply[P.CONFIG])


def test_a_round_without_dp_is_recorded_and_later_dp_claims_are_refused(small_config, policy, tmp_path):
    load_site.cache_clear()
    allowing = policy_from({"ledger_dir": str(tmp_path / "ledgers"), "cache_dir": policy.cache_dir, "require_dp": False})
    baseline = load_site(shlex.join(small_config.overrides + ["privacy=none"]), 0, 3, allowing)
    reply = train_round(baseline, _global(baseline), RecordDict(), server_round=1, run="baseline")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK and P.TRAIN_LOSS in reply[P.METRICS]
    assert math.isinf(reply[P.METRICS][P.EPSILON_SPENT])
    dp = load_site(shlex.join(small_config.overrides), 0, 3, allowing)
    later = train_round(dp, _global(dp), RecordDict(), server_round=1, run="later")
    assert later[P.CONFIG][P.CODE] == P.REFUSAL_BUDGET and "without DP" in later[P.CONFIG][P.REASON]


@pytest.fixture
def logits_site(small_config, policy):
    load_site.cache_clear()
    overrides = small_config.overrides + ["exchange=logits", "exchange.compression=topk", "exchange.topk=2"]
    return load_site(shlex.join(overrides), 1, small_config.sites, policy)


@pytest.mark.parametrize(("announced", "code"), [({P.PUBLIC_SHA256: "0" * 64}, P.REFUSAL_PUBLIC_SET),
                                               ({P.PUBLIC_COUNT: 1}, P.REFUSAL_PUBLIC_SET),
                                               ({P.TEACHER_SHA256: "0" * 64}, P.REFUSAL_TEACHER),
                                               ({P.TEACHER_SHA256: None}, P.REFUSAL_TEACHER)])
@pytest.mark.parametrize("mode", ["weights", "logits"])
def test_a_site_whose_teacher_or_public_set_is_not_the_announced_one_refuses_before_spending_budget(
        site, logits_site, mode, announced, code):
    chosen = site if mode == "weights" else logits_site
    content = _global(chosen)
    content[P.CONFIG] = ConfigRecord({k: v for k, v in {**content[P.CONFIG], **announced}.items() if v is not None})
    reply = train_round(chosen, content, RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.CODE] == code
    assert not (chosen.ledger_dir / LEDGER_FILE).exists()


def test_a_site_refuses_when_its_own_teacher_is_not_the_one_its_policy_pins(small_config, policy):
    load_site.cache_clear()
    pinned = policy_from({**vars(policy), "supernode": {}, "teacher_sha256": "1" * 64})
    site = load_site(shlex.join(small_config.overrides), 0, small_config.sites, pinned)
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_SITE_ERROR
    assert not (site.ledger_dir / LEDGER_FILE).exists()
    load_site.cache_clear()
    right = policy_from({**vars(policy), "supernode": {}, "teacher_sha256": site.assets[P.TEACHER_SHA256]})
    site = load_site(shlex.join(small_config.overrides), 0, small_config.sites, right)
    assert train_round(site, _global(site), RecordDict(), server_round=1, run="t")[P.CONFIG][P.STATUS] == P.STATUS_OK


def test_logits_mode_sends_top_k_log_probabilities_and_never_weights(logits_site):
    reply = train_round(logits_site, _global(logits_site), RecordDict(), server_round=1, run="t")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK
    assert P.ARRAYS not in reply.array_records
    rows = len(logits_site.task.public_inputs())
    assert {k: tuple(v.shape) for k, v in reply[P.LOGITS].items()} == {"values": (rows, 2), "indices": (rows, 2)}
    values = reply[P.LOGITS]["values"].numpy().astype(np.float64)
    assert values.max() <= 0 and np.exp(values).sum(axis=1).max() <= 1 + 1e-3


@pytest.fixture
def fedmd_site(small_config, policy):
    load_site.cache_clear()
    overrides = shlex.join(small_config.overrides + [
        "exchange=logits", "exchange.broadcast=logits", "exchange.site_students=[{hidden:[8]},{hidden:[16,4]}]"])
    return load_site(overrides, 1, small_config.sites, policy)


def test_broadcast_logits_keeps_each_sites_own_student_of_its_own_shape(fedmd_site):
    request = RecordDict({P.CONFIG: ConfigRecord({**fedmd_site.assets, P.SERVER_ROUND: 1})})
    state = RecordDict()
    assert train_round(fedmd_site, request, state, server_round=1, run="t")[P.CONFIG][P.STATUS] == P.STATUS_OK
    kept = state[P.STUDENT_STATE]
    assert [tuple(v.shape) for v in kept.values()] == [(16, 64), (16,), (4, 16), (4,), (10, 4), (10,)]
    # the next round starts from the kept student, not from a fresh one
    resumed = starting_student(fedmd_site, request, state, server_round=2)
    assert all(torch.equal(resumed.state_dict()[k], torch.as_tensor(v.numpy())) for k, v in kept.items())


def test_the_consensus_is_fitted_before_private_training(fedmd_site):
    public = fedmd_site.task.public_inputs()
    torch.manual_seed(1)
    target = torch.log_softmax(torch.randn(len(public), 10) * 3, dim=1)
    request = RecordDict({P.CONSENSUS: ArrayRecord({P.LOGITS: Array(target.numpy())})})

    def kl_to_target(model):
        with torch.no_grad():
            return torch.nn.functional.kl_div(torch.log_softmax(model(public), 1), target, log_target=True,
                                              reduction="batchmean").item()

    fresh = fedmd_site.new_student()
    fitted = starting_student(fedmd_site, request, RecordDict(), server_round=2)
    assert kl_to_target(fitted) < kl_to_target(fresh) - 1e-3  # a few Adam steps (exchange.public_fit_epochs=2)


def test_a_site_trains_on_its_own_records_from_its_policy(small_config, policy, tmp_path):
    load_site.cache_clear()
    rng = np.random.default_rng(0)
    path = tmp_path / "records.npz"
    np.savez(path, images=rng.random((40, 8, 8), dtype=np.float32), labels=rng.integers(0, 10, 40))
    own = policy_from({"ledger_dir": policy.ledger_dir, "cache_dir": policy.cache_dir, "data_path": str(path)})
    site = load_site(shlex.join(small_config.overrides), 0, 1, own)
    assert len(site.data) == 40 and site.fingerprint.partition == "whole"
    assert train_round(site, _global(site), RecordDict(), server_round=1, run="t")[P.CONFIG][P.STATUS] == P.STATUS_OK


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 7, 7), np.float32), "labels": np.zeros(4, np.int64)}, "images have shape"),
        ({"images": np.zeros((4, 8, 8), np.float32), "labels": np.full(4, 10)}, "labels are not integers in"),
        ({"images": np.full((4, 8, 8), 255.0, np.float32), "labels": np.zeros(4, np.int64)}, "in \\[0, 1\\]"),
        ({"pictures": np.zeros((4, 8, 8), np.float32)}, "cannot be read"),
    ],
)
def test_a_bad_site_data_file_is_named_with_the_fix(small_config, policy, tmp_path, arrays, message):
    load_site.cache_clear()
    path = tmp_path / "records.npz"
    np.savez(path, **arrays)
    own = policy_from({"ledger_dir": policy.ledger_dir, "cache_dir": policy.cache_dir, "data_path": str(path)})
    with pytest.raises(ConfigError, match=message) as err:
        load_site(shlex.join(small_config.overrides), 0, 1, own)
    assert str(path) in str(err.value) and ".npz file with" in str(err.value)


def test_noisy_count_weighting_sends_a_count_charged_in_the_ledger(small_config, policy):
    load_site.cache_clear()
    site = load_site(shlex.join(small_config.overrides + ["exchange.weighting=noisy_count"]), 0, 3, policy)
    first = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    count = first[P.METRICS][P.NOISY_COUNT]
    assert abs(count - len(site.data)) < 8 * site.config.exchange.count_noise
    [release, dp] = _entries(site)
    assert release.released == count and (release.sample_rate, release.steps) == (1.0, 1) and dp.released is None
    second = train_round(site, _global(site), RecordDict(), server_round=2, run="t")
    assert second[P.METRICS][P.NOISY_COUNT] == count and len(_entries(site)) == 3  # released once
    assert P.reply_items(first) <= set(P.released_items(mode="weights", weighting="noisy_count", dp=True))


def test_a_round_is_trained_once_per_run_however_often_it_is_asked_for(site):
    assert train_round(site, _global(site), RecordDict(), server_round=1, run="t")[P.CONFIG][P.STATUS] == P.STATUS_OK
    again = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert again[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST and "already trained" in again[P.CONFIG][P.REASON]
    assert len(_entries(site)) == 1


def test_epsilon_is_reported_at_the_delta_the_run_asked_for(small_config, policy):
    load_site.cache_clear()
    site = load_site(shlex.join(small_config.overrides + ["privacy.delta=1e-7"]), 0, 3, policy)
    reply = train_round(site, _global(site), RecordDict(), server_round=1, run="t")
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(site.ledger().epsilon_spent(1e-7))
    assert reply[P.METRICS][P.EPSILON_SPENT] > site.ledger().epsilon_spent()  # smaller delta, larger epsilon
