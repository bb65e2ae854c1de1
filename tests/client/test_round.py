"""A site's round without Flower's processes: the ledger decides, the reply says why, and only what
may leave the site does."""

import math
import multiprocessing
import os
import stat

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

import client.round as client_round
from client.admission import starting_student
from client.round import train_round
from common import payload as P
from common.config import ConfigError, load_config
from common.monitoring import ACTIVITY_FILE, record_activity
from common.policy import policy_from
from common.privacy import LEDGER_FILE, Budget, PrivacyLedger
from fedistill.inprocess import federate


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def _train(site, content, state=None, *, server_round=1, run="t"):
    return train_round(site, content, RecordDict() if state is None else state, server_round=server_round, run=run,
                       generator=_seeded(server_round))


def _entries(site):
    return site.ledger().entries


def test_a_dp_round_reserves_in_the_ledger_and_replies_only_what_may_leave_the_site(site, round_content):
    reply = _train(site, round_content(site))
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK
    [entry] = _entries(site)
    assert entry.round == 1 and entry.dp and entry.steps == reply[P.METRICS][P.DP_STEPS]
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(site.ledger().epsilon_spent())
    assert 0 < reply[P.METRICS][P.EPSILON_SPENT] < site.config.privacy.epsilon
    # no record count, no loss, no timing: exactly the items the privacy report lists
    assert P.reply_items(reply) == {P.ARRAYS, "config/status", "config/site", "metrics/epsilon-spent",
                                    "metrics/epsilon-budget", "metrics/noise-multiplier", "metrics/dp-steps",
                                    "metrics/sample-rate"}
    assert P.reply_items(reply) <= set(P.released_items(mode="weights", weighting="uniform", dp=True))


def test_a_reply_reports_this_runs_spend_and_not_the_sites_spend_in_other_runs(site, round_content):
    other = site.ledger()
    other.reserve(limit=other.budget, noise_multiplier=3.0, sample_rate=0.1, steps=30, run="another-federation",
                  round=1)
    before = other.epsilon_spent()
    reply = _train(site, round_content(site), run="this-run")
    ledger = site.ledger()
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(ledger.epsilon_of_run("this-run", 1e-5))
    assert reply[P.METRICS][P.EPSILON_SPENT] < ledger.epsilon_spent()  # the total, other runs included, stays here
    assert before > 0


def test_the_ledger_holds_the_round_before_training_starts(site, round_content, monkeypatch):
    seen = []

    def training_that_fails(*args, **kwargs):
        seen.append([e.round for e in site.ledger().entries])  # read from disk, as another process would
        raise RuntimeError("the machine lost power")

    monkeypatch.setattr(client_round, "distill_locally", training_that_fails)
    with pytest.raises(RuntimeError):
        _train(site, round_content(site))
    assert seen == [[1]]


def test_noise_is_calibrated_for_the_rounds_the_site_has_left(site, round_content):
    # told this is its only round of two, the site spends its whole budget now
    reply = _train(site, round_content(site, rounds_left=1))
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(site.config.privacy.epsilon, rel=1e-3)
    assert reply[P.METRICS][P.EPSILON_SPENT] <= site.config.privacy.epsilon


def test_with_half_the_sites_sampled_each_participating_site_spends_its_budget(tmp_path, cache_dir):
    """Four sites, four rounds, two sampled per round by the server's round engine: a site sits rounds
    out, and since it is told the rounds it has left, it still ends close to its whole budget."""
    config = load_config(["task=digits", "sites=4", "rounds=4", "federation.fraction_train=0.5",
                          f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}"])
    trained: dict[int, list[int]] = {}  # round -> nodes that trained it

    def note(node, content, reply):
        if reply[P.CONFIG][P.STATUS] == P.STATUS_OK:
            trained.setdefault(content[P.CONFIG][P.SERVER_ROUND], []).append(node)

    _, wire = federate(config, dp_seed=0, on_reply=note)
    assert sorted(trained) == [1, 2, 3, 4] and all(len(nodes) == 2 for nodes in trained.values())
    per_site = [sum(node in nodes for nodes in trained.values()) for node in range(4)]
    assert min(per_site) < 4  # some sites sat rounds out
    joined = {f"site-{node}" for node, count in enumerate(per_site) if count}
    assert joined <= set(wire["epsilon_by_site"])
    for site_name in joined:
        assert 0.9 * config.privacy.epsilon <= wire["epsilon_by_site"][site_name] <= config.privacy.epsilon, wire


def test_a_site_whose_budget_is_spent_refuses_without_telling_its_spend(site, round_content):
    for rnd in (1, 2):  # the run's two rounds spend the whole budget
        assert _train(site, round_content(site), server_round=rnd, run="first")[P.CONFIG][P.STATUS] == P.STATUS_OK
    assert site.ledger().epsilon_spent() == pytest.approx(site.config.privacy.epsilon, rel=1e-3)
    reply = _train(site, round_content(site), run="second")
    assert (reply[P.CONFIG][P.STATUS], reply[P.CONFIG][P.CODE]) == (P.STATUS_REFUSED, P.REFUSAL_BUDGET)
    assert P.ARRAYS not in reply.array_records
    assert len(_entries(site)) == 2
    assert reply[P.METRICS][P.EPSILON_SPENT] == 0.0  # this run spent nothing; the other run's spend stays here
    assert "3" not in reply[P.CONFIG][P.REASON]


def test_a_corrupt_ledger_makes_the_site_refuse_without_sending_its_path(site, round_content):
    site.ledger_dir.mkdir(parents=True, exist_ok=True)
    (site.ledger_dir / LEDGER_FILE).write_text('{"format": "fedistill-privacy-ledger", "version": 2, "entr')
    reply = _train(site, round_content(site))
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_LEDGER
    assert str(site.ledger_dir) not in str(reply[P.CONFIG]) and "/" not in reply[P.CONFIG][P.REASON]
    assert (site.ledger_dir / LEDGER_FILE).read_text().endswith('"entr')


def test_sites_hold_disjoint_private_data_that_covers_the_private_part(small_config, policy, make_site):
    sites = [make_site(small_config.overrides, policy, i, small_config.sites) for i in range(small_config.sites)]
    rows = [tuple(x.flatten().tolist()) for site in sites for x in site.data.tensors[0]]
    private = sites[0].task._parts["private"].tensors[0]
    assert len(rows) == len(private)
    assert set(rows) == {tuple(x.flatten().tolist()) for x in private}


def test_sites_declared_to_share_records_hold_the_same_shard_each_with_its_own_ledger(small_config, tmp_path,
                                                                                      cache_dir, make_site):
    # The sharing is the sites' own setting (their site file's task: block), as for the partition.
    policy = policy_from({"ledger_dir": str(tmp_path / "ledgers"), "cache_dir": cache_dir,
                          "task": {"sites_per_record": 2}})
    first, second, other = (make_site(small_config.overrides, policy, i, 4) for i in (0, 2, 1))
    assert torch.equal(first.records.tensors[0], second.records.tensors[0])
    assert not torch.equal(first.records.tensors[0], other.records.tensors[0])
    for holder in (first, second):
        holder.ledger().reserve(limit=Budget(3.0, 1e-5), noise_multiplier=2.0, sample_rate=0.1, steps=10,
                                run="r", round=1)
    assert first.ledger_dir != second.ledger_dir
    assert first.fingerprint.copies == 2


def test_a_worker_keeps_only_the_sites_it_played_last(small_config, policy, make_site):
    from client import site as site_module

    played = [make_site(small_config.overrides, policy, i, 40) for i in range(40)]
    assert len(site_module._SITES) == site_module.CACHED_SITES
    assert make_site(small_config.overrides, policy, 39, 40) is played[39]
    assert make_site(small_config.overrides, policy, 0, 40) is not played[0]  # dropped, built again


@pytest.mark.parametrize("corrupt", ["shape", "nan", "inf", "huge"])
def test_a_malformed_request_is_refused_before_any_budget_is_spent(site, round_content, corrupt):
    request = round_content(site)
    arrays = {k: v.numpy().copy() for k, v in request[P.ARRAYS].items()}
    if corrupt == "shape":
        arrays["net.1.weight"] = np.zeros((3, 3), dtype=np.float32)
    else:
        arrays["net.1.weight"][0, 0] = {"nan": np.nan, "inf": np.inf, "huge": 1e9}[corrupt]
    request[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    reply = _train(site, request)
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST
    assert not (site.ledger_dir / LEDGER_FILE).exists()


@pytest.mark.parametrize("server_round, rounds_left", [(3, 1), (1, 3), (2, 0)])
def test_impossible_round_numbers_are_refused_before_any_budget_is_spent(site, round_content, server_round,
                                                                        rounds_left):
    reply = _train(site, round_content(site, rounds_left), server_round=server_round)
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST
    assert not (site.ledger_dir / LEDGER_FILE).exists()


def test_a_round_without_dp_is_recorded_and_later_dp_claims_are_refused(small_config, tmp_path, cache_dir,
                                                                       make_site, round_content):
    allowing = policy_from({"ledger_dir": str(tmp_path / "ledgers"), "cache_dir": cache_dir, "require_dp": False})
    baseline = make_site(small_config.overrides + ["privacy=none"], allowing)
    reply = _train(baseline, round_content(baseline), run="baseline")
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK and P.TRAIN_LOSS in reply[P.METRICS]
    assert math.isinf(reply[P.METRICS][P.EPSILON_SPENT])
    dp = make_site(small_config.overrides, allowing)
    later = _train(dp, round_content(dp), run="later")
    assert later[P.CONFIG][P.CODE] == P.REFUSAL_BUDGET


@pytest.fixture
def logits_site(small_config, policy, make_site):
    return make_site(small_config.overrides + ["exchange=logits", "exchange.compression=topk", "exchange.topk=2"],
                     policy, 1)


@pytest.mark.parametrize(("announced", "code"), [({P.PUBLIC_SHA256: "0" * 64}, P.REFUSAL_PUBLIC_SET),
                                               ({P.PUBLIC_COUNT: 1}, P.REFUSAL_PUBLIC_SET),
                                               ({P.TEACHER_SHA256: "0" * 64}, P.REFUSAL_TEACHER),
                                               ({P.TEACHER_SHA256: None}, P.REFUSAL_TEACHER)])
@pytest.mark.parametrize("mode", ["weights", "logits"])
def test_a_site_whose_teacher_or_public_set_is_not_the_announced_one_refuses_before_spending_budget(
        site, logits_site, round_content, mode, announced, code):
    chosen = site if mode == "weights" else logits_site
    content = round_content(chosen)
    content[P.CONFIG] = ConfigRecord({k: v for k, v in {**content[P.CONFIG], **announced}.items() if v is not None})
    reply = _train(chosen, content)
    assert reply[P.CONFIG][P.CODE] == code
    assert not (chosen.ledger_dir / LEDGER_FILE).exists()


def test_the_records_are_read_only_after_every_check_that_needs_none_of_them(site, round_content, monkeypatch):
    read = []
    monkeypatch.setattr(type(site.task), "private_data", lambda *args: read.append(1) or pytest.fail("records read"))
    reply = _train(site, round_content(site, **{P.TEACHER_SHA256: "0" * 64}))
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_TEACHER and not read


def test_a_site_refuses_when_its_own_teacher_is_not_the_one_its_policy_pins(small_config, policy, make_site,
                                                                            round_content):
    pinned = policy_from({**vars(policy), "supernode": {}, "teacher_sha256": "1" * 64})
    site = make_site(small_config.overrides, pinned)
    reply = _train(site, round_content(site))
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_SITE_ERROR
    assert not (site.ledger_dir / LEDGER_FILE).exists()
    right = policy_from({**vars(policy), "supernode": {}, "teacher_sha256": site.assets[P.TEACHER_SHA256]})
    site = make_site(small_config.overrides, right)
    assert _train(site, round_content(site))[P.CONFIG][P.STATUS] == P.STATUS_OK


def test_logits_mode_sends_top_k_log_probabilities_and_never_weights(logits_site, round_content):
    reply = _train(logits_site, round_content(logits_site))
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK
    assert P.ARRAYS not in reply.array_records
    rows = len(logits_site.task.public_inputs())
    assert {k: tuple(v.shape) for k, v in reply[P.LOGITS].items()} == {"values": (rows, 2), "indices": (rows, 2)}
    values = reply[P.LOGITS]["values"].numpy().astype(np.float64)
    assert values.max() <= 0 and np.exp(values).sum(axis=1).max() <= 1 + 1e-3


@pytest.fixture
def fedmd_site(small_config, policy, make_site):
    overrides = small_config.overrides + [
        "exchange=logits", "exchange.broadcast=logits", "exchange.site_students=[{hidden:[8]},{hidden:[16,4]}]"]
    return make_site(overrides, policy, 1)


def test_broadcast_logits_keeps_each_sites_own_student_of_its_own_shape(fedmd_site, round_content):
    request = round_content(fedmd_site)
    del request[P.ARRAYS]
    state = RecordDict()
    assert _train(fedmd_site, request, state)[P.CONFIG][P.STATUS] == P.STATUS_OK
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


def _records(tmp_path, count=40, name="records.npz"):
    rng = np.random.default_rng(0)
    path = tmp_path / name
    np.savez(path, images=rng.random((count, 8, 8), dtype=np.float32), labels=rng.integers(0, 10, count))
    return path


def test_a_site_trains_on_its_own_records_from_its_policy(small_config, policy, tmp_path, make_site, round_content):
    own = policy_from({"ledger_dir": policy.ledger_dir, "cache_dir": policy.cache_dir,
                       "data_path": str(_records(tmp_path))})
    site = make_site(small_config.overrides, own, 0, 1)
    assert len(site.data) == 40 and site.fingerprint.partition == "whole"
    assert _train(site, round_content(site))[P.CONFIG][P.STATUS] == P.STATUS_OK


def test_a_sites_delta_at_or_above_one_over_its_records_makes_it_refuse_every_round(small_config, tmp_path,
                                                                                   cache_dir, make_site, round_content):
    own = policy_from({"ledger_dir": str(tmp_path / "ledgers"), "cache_dir": cache_dir, "delta": 0.05,
                       "data_path": str(_records(tmp_path, count=40))})
    site = make_site(small_config.overrides + ["privacy.delta=0.01"], own, 0, 1)
    reply = _train(site, round_content(site))
    assert reply[P.CONFIG][P.CODE] == P.REFUSAL_SITE_ERROR and "40" not in reply[P.CONFIG][P.REASON]
    assert not (site.ledger_dir / LEDGER_FILE).exists()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 7, 7), np.float32), "labels": np.zeros(4, np.int64)}, "images have shape"),
        ({"images": np.zeros((4, 8, 8), np.float32), "labels": np.full(4, 10)}, "labels are not integers in"),
        ({"images": np.full((4, 8, 8), 255.0, np.float32), "labels": np.zeros(4, np.int64)}, "in \\[0, 1\\]"),
        ({"pictures": np.zeros((4, 8, 8), np.float32)}, "cannot be read"),
    ],
)
def test_a_bad_site_data_file_is_named_with_the_fix(small_config, policy, tmp_path, make_site, arrays, message):
    path = tmp_path / "records.npz"
    np.savez(path, **arrays)
    own = policy_from({"ledger_dir": policy.ledger_dir, "cache_dir": policy.cache_dir, "data_path": str(path)})
    with pytest.raises(ConfigError, match=message) as err:
        make_site(small_config.overrides, own, 0, 1).records
    assert str(path) in str(err.value) and ".npz file with" in str(err.value)


def test_noisy_count_weighting_sends_a_count_charged_in_the_ledger(small_config, policy, make_site, round_content):
    site = make_site(small_config.overrides + ["exchange.weighting=noisy_count"], policy)
    first = _train(site, round_content(site))
    count = first[P.METRICS][P.NOISY_COUNT]
    assert abs(count - len(site.data)) < 8 * site.config.exchange.count_noise
    [release, dp] = _entries(site)
    assert release.released == count and (release.sample_rate, release.steps) == (1.0, 1) and dp.released is None
    second = _train(site, round_content(site, server_round=2), server_round=2)
    assert second[P.METRICS][P.NOISY_COUNT] == count and len(_entries(site)) == 3  # released once
    assert P.reply_items(first) <= set(P.released_items(mode="weights", weighting="noisy_count", dp=True))


def test_a_round_is_trained_once_per_run_however_often_it_is_asked_for(site, round_content):
    assert _train(site, round_content(site))[P.CONFIG][P.STATUS] == P.STATUS_OK
    again = _train(site, round_content(site))
    assert again[P.CONFIG][P.CODE] == P.REFUSAL_BAD_REQUEST and "already trained" in again[P.CONFIG][P.REASON]
    assert len(_entries(site)) == 1


def _admit(folder, fingerprint, results):
    ledger = PrivacyLedger(folder, budget=Budget(3.0, 1e-5), data=fingerprint)
    try:
        ledger.admit_round(run="r", round=1, most_rounds=5, sample_rate=0.1, steps=10, limit=Budget(3.0, 1e-5),
                           planned_steps=10, max_noise_multiplier=20.0)
        results.put("admitted")
    except Exception as err:  # noqa: BLE001 - the kind of refusal is the result
        results.put(type(err).__name__)


def test_two_concurrent_requests_for_one_round_train_it_once(site):
    """The replay check and the reservation happen under one lock: of two processes asking for
    the same round at once, exactly one is admitted."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_admit, args=(site.ledger_dir, site.fingerprint, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == ["RoundAlreadyTrained"] * 3 + ["admitted"], outcomes
    assert len(_entries(site)) == 1


def test_the_ledger_and_the_activity_log_are_the_sites_alone(site, round_content):
    _train(site, round_content(site))
    record_activity(site.ledger_dir, run="t", server_round=1, status="ok", steps=3)
    assert stat.S_IMODE(site.ledger_dir.stat().st_mode) == 0o700
    for name in (LEDGER_FILE, ACTIVITY_FILE):
        assert stat.S_IMODE((site.ledger_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(site.ledger_dir.parent / ".ledgers.lock").st_mode) == 0o600


def test_epsilon_is_reported_at_the_delta_the_run_asked_for(small_config, policy, make_site, round_content):
    site = make_site(small_config.overrides + ["privacy.delta=1e-7"], policy)
    reply = _train(site, round_content(site))
    assert reply[P.METRICS][P.EPSILON_SPENT] == pytest.approx(site.ledger().epsilon_spent(1e-7))
    assert reply[P.METRICS][P.EPSILON_SPENT] > site.ledger().epsilon_spent()  # smaller delta, larger epsilon
