"""What travels each round and how the server combines it: `weights` or `logits` exchange.

An exchange says what the server sends (`outgoing`), checks every reply before it can
touch the global student (`check`), and turns the accepted replies into the next global
student (`combine`). The Flower strategy and the benchmarks drive the same objects.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from common import compression
from common import payload as P
from common.config import Config
from common.public_distill import distill_on_public
from common.losses import LOGITS
from common.tasks import Task
from server.aggregate import aggregate

ArraySpec = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
LOGPROB_TOLERANCE = 1e-2  # float16 rounding of log-probabilities near 0


class Exchange(Protocol):
    def outgoing(self, global_student: nn.Module) -> RecordDict: ...
    def check(self, content: RecordDict) -> str: ...
    def reply_bytes(self, content: RecordDict) -> int: ...
    def combine(self, replies: list[RecordDict], global_student: nn.Module, server_round: int,
                weights: np.ndarray | None = None) -> dict: ...


def check_arrays(record: ArrayRecord, expected: ArraySpec, *, max_abs: float, max_bytes: int) -> str:
    """Why `record` is unacceptable, or '' if it holds exactly the expected, finite, bounded arrays."""
    if set(record.keys()) != set(expected):
        missing, extra = sorted(set(expected) - set(record.keys())), sorted(set(record.keys()) - set(expected))
        return f"expected arrays {sorted(expected)}, missing {missing}, unexpected {extra}"
    size = P.record_bytes(record)
    if size > max_bytes:
        return f"reply of {size} bytes exceeds the limit of {max_bytes} bytes (exchange.max_reply_mb)"
    for name, (shape, dtype) in expected.items():
        array = record[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return f"array {name!r} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        values = array.numpy()
        if values.dtype.kind == "f":
            if not np.isfinite(values).all():
                return f"array {name!r} holds NaN or infinite values"
            if values.size and np.abs(values).max() > max_abs:
                return f"array {name!r} has |value| {np.abs(values).max():.3g} > exchange.max_abs_value {max_abs:g}"
    return ""


def _spec(model: nn.Module) -> ArraySpec:
    return {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in P.model_to_record(model).items()}


def _weights(replies: list[RecordDict], weighting: str, weights: np.ndarray | None) -> np.ndarray:
    """Per-site weights for the mean: equal (a site sends no record count), or each site's noisy
    count (at least 1); `weights` overrides both (the benchmark's non-private reference)."""
    if weights is not None:
        return np.asarray(weights, dtype=np.float64)
    if weighting == "noisy_count":
        return np.array([max(1.0, float(r[P.METRICS][P.NOISY_COUNT])) for r in replies])
    return np.ones(len(replies))


def check_count(content: RecordDict, weighting: str) -> str:
    """Why a reply cannot be weighted as `weighting` says, or ''."""
    if weighting != "noisy_count":
        return ""
    count = content.metric_records.get(P.METRICS, {}).get(P.NOISY_COUNT)
    if count is None or not np.isfinite(float(count)):
        return f"reply has no finite {P.NOISY_COUNT!r} to weight it by (exchange.weighting=noisy_count)"
    return ""


class WeightsExchange:
    """Sites send DP-trained student weights; the server aggregates them coordinate-wise."""

    def __init__(self, config: Config, global_student: nn.Module):
        self.config = config.exchange
        self.expected = _spec(global_student)
        self.max_bytes = int(self.config.max_reply_mb * 2**20)

    def outgoing(self, global_student: nn.Module) -> RecordDict:
        return RecordDict({P.ARRAYS: P.model_to_record(global_student)})

    def check(self, content: RecordDict) -> str:
        if P.ARRAYS not in content.array_records:
            return f"reply has no {P.ARRAYS!r} ArrayRecord"
        return (check_arrays(content[P.ARRAYS], self.expected, max_abs=self.config.max_abs_value, max_bytes=self.max_bytes)
                or check_count(content, self.config.weighting))

    def reply_bytes(self, content: RecordDict) -> int:
        return P.record_bytes(content[P.ARRAYS])

    def combine(self, replies: list[RecordDict], global_student: nn.Module, server_round: int,
                weights: np.ndarray | None = None) -> dict:
        weights = _weights(replies, self.config.weighting, weights)
        merged = {}
        for name, (_, dtype) in self.expected.items():
            stack = np.stack([r[P.ARRAYS][name].numpy() for r in replies])
            merged[name] = Array(aggregate(stack, weights, method=self.config.aggregation,
                                           trim_fraction=self.config.trim_fraction).astype(dtype))
        P.load_record(global_student, ArrayRecord(merged))
        return {}


class LogitsExchange:
    """Sites send student logits on the public inputs; the server aggregates and distills.

    The combined soft labels (optionally mixed with the teacher's public logits) train
    the global student on the public inputs. With broadcast=weights the sites start each
    round from that student (FedDF); with broadcast=logits they receive the consensus
    logits and keep their own students, which may differ per site (FedMD).
    """

    def __init__(self, config: Config, task: Task):
        self.config = config.exchange
        self.seed = config.seed
        self.inputs = task.public_inputs()
        self.classes = task.num_classes
        self.manifest = P.public_manifest(self.inputs)
        self.teacher_logits = task.teacher_targets(self.inputs, (LOGITS,))[LOGITS]  # [P, C]
        self.expected = compression.expected_arrays(method=self.config.compression, k=self.config.topk,
                                                    rows=len(self.inputs), classes=self.classes)
        self.max_bytes = int(self.config.max_reply_mb * 2**20)
        self.consensus: torch.Tensor | None = None  # [P, C], last round's aggregate

    def outgoing(self, global_student: nn.Module) -> RecordDict:
        content = RecordDict({P.CONFIG: ConfigRecord(dict(self.manifest))})
        if self.config.broadcast == "weights":
            content[P.ARRAYS] = P.model_to_record(global_student)
        elif self.consensus is not None:
            content[P.CONSENSUS] = ArrayRecord({P.LOGITS: Array(self.consensus.numpy())})
        return content

    def check(self, content: RecordDict) -> str:
        if P.LOGITS not in content.array_records:
            return f"reply has no {P.LOGITS!r} ArrayRecord"
        record = content[P.LOGITS]
        problem = (check_arrays(record, self.expected, max_abs=self.config.max_abs_value, max_bytes=self.max_bytes)
                   or check_count(content, self.config.weighting))
        if problem:
            return problem
        if self.config.compression == "topk":
            indices = record[compression.INDICES].numpy().astype(np.int64)
            if indices.size and indices.max() >= self.classes:
                return f"top-k indices must be < {self.classes} classes, got {indices.max()}"
            if (np.diff(np.sort(indices, axis=1), axis=1) == 0).any():
                return "top-k indices repeat a class within a row"
            values = record[compression.VALUES].numpy().astype(np.float64)
            mass = np.exp(values).sum(axis=1)
        else:
            values = record[compression.LOGITS].numpy().astype(np.float64)
            mass = np.exp(values).sum(axis=1)
            if values.size and (np.abs(mass - 1) > LOGPROB_TOLERANCE).any():
                return "a row's probabilities do not sum to 1: the reply is not log-probabilities"
        if values.size and (values.max() > LOGPROB_TOLERANCE or mass.max() > 1 + LOGPROB_TOLERANCE):
            return "the reply's values are not log-probabilities (a value above 0 or a row's mass above 1)"
        return ""

    def reply_bytes(self, content: RecordDict) -> int:
        return P.record_bytes(content[P.LOGITS])

    def combine(self, replies: list[RecordDict], global_student: nn.Module, server_round: int,
                weights: np.ndarray | None = None) -> dict:
        site_logits = np.stack([self._decode(r) for r in replies])  # [S, P, C]
        combined = torch.from_numpy(aggregate(site_logits, _weights(replies, self.config.weighting, weights), method=self.config.aggregation,
                                              trim_fraction=self.config.trim_fraction)).float()
        w = self.config.teacher_weight
        if w > 0:
            combined = (1 - w) * combined + w * self.teacher_logits
        report = distill_on_public(global_student, self.inputs, combined, self.config.server,
                                   seed=self.seed * 1000 + server_round)
        self.consensus = combined  # sent down only once the global student has learned it
        return {"server_distill_epochs": report.epochs, "server_holdout_kl": report.holdout_loss}

    def _decode(self, content: RecordDict) -> np.ndarray:
        arrays = {k: v.numpy() for k, v in content[P.LOGITS].items()}
        # Log-probabilities, renormalised after float16 rounding: raw logits of different
        # students differ by per-row constants, which would dominate a median or mean.
        return torch.log_softmax(compression.decode(arrays, method=self.config.compression, classes=self.classes), dim=1).numpy()


def build_exchange(config: Config, task: Task, global_student: nn.Module) -> Exchange:
    if config.exchange.mode == "weights":
        return WeightsExchange(config, global_student)
    return LogitsExchange(config, task)

