import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import payload as P
from common.config import ConfigError, load_config
from common.tasks import build_task
from common.losses import LOGITS
from common.payload import check_arrays
from server.exchange import LogitsExchange, WeightsExchange, build_exchange
from common.request import decode, encode, request_of
from server.rounds import INVALID, TRAINED, read_content, round_request

ALLOWED = set(P.released_items(mode="logits", weighting="uniform", dp=True))

SPEC = {"logits": ((4, 3), "float32")}


def _record(array):
    return ArrayRecord({"logits": Array(np.asarray(array))})


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.full((4, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((4, 3), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.zeros((5, 3), dtype=np.float32), "expected float32[4, 3]"),
        (np.zeros((4, 3), dtype=np.float64), "expected float32[4, 3]"),
        (np.full((4, 3), 1e9, dtype=np.float32), "max_abs_value"),
        (np.zeros((400, 3), dtype=np.float32), "exceeds the limit"),
    ],
)
def test_bad_arrays_are_named(array, problem):
    assert problem in check_arrays(_record(array), SPEC, max_abs=100, max_bytes=1000)


def test_good_arrays_pass_and_missing_keys_are_named():
    assert check_arrays(_record(np.zeros((4, 3), dtype=np.float32)), SPEC, max_abs=100, max_bytes=1000) == ""
    other = ArrayRecord({"weights": Array(np.zeros((4, 3), dtype=np.float32))})
    assert "missing ['logits']" in check_arrays(other, SPEC, max_abs=100, max_bytes=1000)


@pytest.fixture
def config(tmp_path, cache_dir):
    return load_config(["task=digits", "sites=3", "exchange=logits", "exchange.server.epochs=5",
                        f"run_dir={tmp_path}", f"cache_dir={cache_dir}"])


def _teacher_log_probs(task):
    """Learnable targets: the teacher's log-probabilities on the public inputs."""
    return torch.log_softmax(task.teacher_targets(task.public_inputs(), (LOGITS,))[LOGITS], dim=1).numpy()


def _reply(logits, **extra_metrics):
    return RecordDict({
        P.LOGITS: ArrayRecord({"logits": Array(np.asarray(logits, dtype=np.float32))}),
        P.METRICS: MetricRecord({P.EPSILON_SPENT: 1.0, **extra_metrics}),
        P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_OK, P.SITE: "site-x"}),
    })


def test_logits_exchange_drops_bad_replies_and_distills_on_good_ones(config):
    task = build_task(config)
    exchange = LogitsExchange(config, task)
    rows = len(task.public_inputs())
    good = _teacher_log_probs(task)
    assert read_content(_reply(good), 1, exchange, ALLOWED).status == TRAINED
    bad = read_content(_reply(good[:-1]), 2, exchange, ALLOWED)
    assert bad.status == INVALID and "expected float32" in bad.reason
    raw = read_content(_reply(good + 1.5), 3, exchange, ALLOWED)
    assert raw.status == INVALID and "not log-probabilities" in raw.reason
    student = task.student(config.student)
    before = P.model_to_record(student)["net.1.weight"].numpy().copy()
    report = exchange.combine([_reply(good), _reply(good)], student, server_round=1)
    assert report["server_distill_epochs"] >= 1 and report["teacher_weight"] == 0
    assert not np.allclose(before, P.model_to_record(student)["net.1.weight"].numpy())
    assert exchange.consensus[LOGITS].shape == (rows, 10)


def test_a_reply_holding_anything_a_site_may_not_release_is_dropped(config):
    task = build_task(config)
    exchange = LogitsExchange(config, task)
    good = _teacher_log_probs(task)
    for leak in ({"num-examples": 590}, {P.TRAIN_LOSS: 0.3}, {"train-seconds": 4.2}, {P.NOISY_COUNT: 590.3}):
        outcome = read_content(_reply(good, **leak), 1, exchange, ALLOWED)
        assert outcome.status == INVALID and next(iter(leak)) in outcome.reason
    weights_mode = set(P.released_items(mode="weights", weighting="uniform", dp=True))
    assert read_content(_reply(good), 1, exchange, weights_mode).status == INVALID  # logits not in this run
    # without DP there is no guarantee to break, and the loss may travel
    assert read_content(_reply(good, **{P.TRAIN_LOSS: 0.3}), 1, exchange, set(P.released_items(mode="logits", weighting="uniform", dp=False))).status == TRAINED


def test_a_teacher_weight_chosen_on_public_labels_needs_a_task_whose_public_records_have_them(tmp_path, cache_dir):
    config = load_config(["task=digits", "exchange=logits", "exchange.choose_teacher_weight=true",
                          f"run_dir={tmp_path}", f"cache_dir={cache_dir}"])
    with pytest.raises(ConfigError, match="task=digits's public inputs have none.*exchange.choose_teacher_weight=false"):
        LogitsExchange(config, build_task(config))


def test_the_consensus_is_kept_only_once_the_global_student_has_learned_it(config, monkeypatch):
    task = build_task(config)
    exchange = LogitsExchange(config, task)
    good = _teacher_log_probs(task)

    def failing_fit(*args, **kwargs):
        raise RuntimeError("server-side distillation failed")

    monkeypatch.setattr(exchange.outputs, "fit", failing_fit)
    with pytest.raises(RuntimeError):
        exchange.combine([_reply(good)], task.student(config.student), server_round=1)
    assert exchange.consensus is None


@pytest.mark.parametrize("mode", ["weights", "logits"])
def test_every_round_request_announces_the_run_request_the_teacher_and_the_public_set(config, mode):
    config = load_config(config.overrides + [f"exchange={mode}"])
    task = build_task(config)
    student = task.student(config.student)
    assets = P.asset_manifest(task)
    out = round_request(build_exchange(config, task, student), student, 3, assets, encode(request_of(config)))
    assert decode(out[P.CONFIG][P.REQUEST]) == request_of(config)
    assert out[P.CONFIG][P.PUBLIC_COUNT] == len(task.public_inputs())
    assert out[P.CONFIG][P.PUBLIC_SHA256] == P.public_manifest(task.public_inputs())[P.PUBLIC_SHA256]
    assert out[P.CONFIG][P.TEACHER_SHA256] == task.teacher_digest() and len(task.teacher_digest()) == 64
    assert out[P.CONFIG][P.SERVER_ROUND] == 3
    assert P.ARRAYS in out.array_records  # broadcast=weights by default


def test_weights_exchange_refuses_a_student_of_another_shape(config):
    task = build_task(config)
    student = task.student(config.student)
    exchange = WeightsExchange(config, task, student)
    other = torch.nn.Linear(3, 3)
    assert "expected arrays" in exchange.check(RecordDict({P.ARRAYS: P.model_to_record(other)}))
    assert exchange.check(RecordDict({P.ARRAYS: P.model_to_record(student)})) == ""


def test_weights_exchange_counts_sites_equally(config):
    config = dataclasses.replace(config, exchange=dataclasses.replace(
        config.exchange, server=dataclasses.replace(config.exchange.server, distill_teacher=False)))
    task = build_task(config)
    student = task.student(config.student)
    exchange = WeightsExchange(config, task, student)
    replies = []
    for value in (0.0, 0.0, 3.0):
        model = task.student(config.student)
        for p in model.parameters():
            p.data.fill_(value)
        replies.append(RecordDict({P.ARRAYS: P.model_to_record(model)}))
    exchange.combine(replies, student, server_round=1)
    assert all(torch.allclose(p, torch.ones_like(p)) for p in student.parameters())


def test_inconsistent_topk_replies_are_invalid(tmp_path, cache_dir):
    config = load_config(["task=digits", "sites=3", "exchange=logits", "exchange.compression=topk", "exchange.topk=3",
                          f"run_dir={tmp_path}", f"cache_dir={cache_dir}"])
    task = build_task(config)
    exchange = LogitsExchange(config, task)
    rows = len(task.public_inputs())

    def reply(indices, value=-2.0):
        return RecordDict({
            P.LOGITS: ArrayRecord({"values": Array(np.full((rows, 3), value, dtype=np.float16)),
                                   "indices": Array(np.asarray(indices, dtype=np.uint16))}),
            P.METRICS: MetricRecord({P.EPSILON_SPENT: 1.0}),
        })

    good = np.tile([0, 1, 2], (rows, 1))
    assert read_content(reply(good), 1, exchange, ALLOWED).status == TRAINED
    assert "< 10 classes" in read_content(reply(np.tile([0, 1, 12], (rows, 1))), 1, exchange, ALLOWED).reason
    assert "repeat" in read_content(reply(np.tile([0, 1, 1], (rows, 1))), 1, exchange, ALLOWED).reason
    assert "not log-probabilities" in read_content(reply(good, value=0.5), 1, exchange, ALLOWED).reason
    assert "not log-probabilities" in read_content(reply(good, value=-0.5), 1, exchange, ALLOWED).reason  # mass 1.8


def test_noisy_count_weighting_weights_sites_by_their_counts_and_drops_replies_without_one(tmp_path, cache_dir):
    config = load_config(["task=digits", "sites=3", "exchange.weighting=noisy_count",
                          "exchange.server.distill_teacher=false", f"run_dir={tmp_path}", f"cache_dir={cache_dir}"])
    task = build_task(config)
    student = task.student(config.student)
    exchange = WeightsExchange(config, task, student)

    def reply(value, count):
        model = task.student(config.student)
        for p in model.parameters():
            p.data.fill_(value)
        metrics = MetricRecord({} if count is None else {P.NOISY_COUNT: count})
        return RecordDict({P.ARRAYS: P.model_to_record(model), P.METRICS: metrics})

    assert "noisy-count" in exchange.check(reply(0.0, None))
    assert "noisy-count" in exchange.check(reply(0.0, float("nan")))
    exchange.combine([reply(0.0, 300.0), reply(4.0, 100.0)], student, server_round=1)
    assert all(torch.allclose(p, torch.ones_like(p)) for p in student.parameters())


def test_the_weights_exchange_distills_the_combined_student_toward_the_teacher_at_no_privacy_cost(tmp_path, cache_dir):
    """After averaging, the server fits the global student to the teacher on the public and transfer inputs:
    the teacher's outputs only, so no site's ledger is touched (the federation tests check the ledgers)."""
    overrides = ["task=digits", "exchange.server.epochs=20", f"run_dir={tmp_path}", f"cache_dir={cache_dir}"]
    config = load_config(overrides)
    task = build_task(config)
    torch.manual_seed(0)
    replies = [RecordDict({P.ARRAYS: P.model_to_record(task.student(config.student))}) for _ in range(2)]
    agreement = {}
    for distill_teacher in (False, True):
        settings = load_config(overrides + [f"exchange.server.distill_teacher={distill_teacher}"])
        student = task.student(settings.student)
        report = WeightsExchange(settings, task, student).combine(replies, student, server_round=1)
        agreement[distill_teacher] = task.evaluator()(student)["agreement"]
        assert ("server_distill_epochs" in report) == distill_teacher
    assert agreement[True] > agreement[False] + 0.3
