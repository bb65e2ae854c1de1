import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import payload as P
from common.config import load_config
from common.task import build_task
from server.exchange import LogitsExchange, WeightsExchange, check_arrays
from server.strategy import INVALID, TRAINED, read_content

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


def _reply(logits, examples=10):
    return RecordDict({
        P.LOGITS: ArrayRecord({"logits": Array(logits)}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: examples}),
        P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_OK, P.SITE: "site-x"}),
    })


def test_logits_exchange_drops_bad_replies_and_distills_on_good_ones(config):
    task = build_task(config)
    exchange = LogitsExchange(config, task, task.teacher())
    rows = len(task.public_inputs())
    good = exchange.teacher_logits.numpy().astype(np.float32)  # learnable targets
    assert read_content(_reply(good), 1, exchange).status == TRAINED
    bad = read_content(_reply(good[:-1]), 2, exchange)
    assert bad.status == INVALID and "expected float32" in bad.reason
    assert read_content(_reply(good, examples=0), 3, exchange).status == INVALID
    student = task.student(config.student)
    before = P.model_to_record(student)["net.1.weight"].numpy().copy()
    report = exchange.combine([_reply(good), _reply(good)], student, server_round=1)
    assert report["server_distill_epochs"] >= 1
    assert not np.allclose(before, P.model_to_record(student)["net.1.weight"].numpy())
    assert exchange.consensus.shape == (rows, 10)


def test_logits_exchange_sends_the_public_manifest(config):
    task = build_task(config)
    exchange = LogitsExchange(config, task, task.teacher())
    out = exchange.outgoing(task.student(config.student))
    assert out[P.CONFIG][P.PUBLIC_COUNT] == len(task.public_inputs())
    assert out[P.CONFIG][P.PUBLIC_SHA256] == P.public_manifest(task.public_inputs())[P.PUBLIC_SHA256]
    assert P.ARRAYS in out.array_records  # broadcast=weights by default


def test_weights_exchange_refuses_a_student_of_another_shape(config):
    task = build_task(config)
    student = task.student(config.student)
    exchange = WeightsExchange(config, student)
    other = torch.nn.Linear(3, 3)
    reply = RecordDict({P.ARRAYS: P.model_to_record(other), P.METRICS: MetricRecord({P.NUM_EXAMPLES: 5})})
    assert "expected arrays" in exchange.check(reply)
    assert exchange.check(RecordDict({P.ARRAYS: P.model_to_record(student)})) == ""


def test_inconsistent_topk_replies_are_invalid_and_nan_counts_do_not_crash(tmp_path, cache_dir):
    config = load_config(["task=digits", "sites=3", "exchange=logits", "exchange.compression=topk", "exchange.topk=3",
                          f"run_dir={tmp_path}", f"cache_dir={cache_dir}"])
    task = build_task(config)
    exchange = LogitsExchange(config, task, task.teacher())
    rows = len(task.public_inputs())

    def reply(indices, lse=5.0, examples=10.0):
        return RecordDict({
            P.LOGITS: ArrayRecord({"values": Array(np.ones((rows, 3), dtype=np.float16)),
                                   "indices": Array(np.asarray(indices, dtype=np.uint16)),
                                   "logsumexp": Array(np.full(rows, lse, dtype=np.float32))}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: examples}),
        })

    good = np.tile([0, 1, 2], (rows, 1))
    assert read_content(reply(good), 1, exchange).status == TRAINED
    assert "< 10 classes" in read_content(reply(np.tile([0, 1, 12], (rows, 1))), 1, exchange).reason
    assert "repeat" in read_content(reply(np.tile([0, 1, 1], (rows, 1))), 1, exchange).reason
    assert "logsumexp" in read_content(reply(good, lse=0.0), 1, exchange).reason
    assert read_content(reply(good, examples=float("nan")), 1, exchange).status == INVALID
