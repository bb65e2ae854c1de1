"""What travels each round and how the server combines it: `weights` or `logits` exchange.

An exchange says what the server sends (`outgoing`), checks every reply before it can
touch the global student (`check`), and turns the accepted replies into the next global
student (`combine`). The Flower strategy and the benchmarks drive the same objects. What it
carries from round to round is its `state_dict()`, which a resumed run loads back.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn

from common import payload as P
from common.config import Config, ConfigError
from common.public_distill import TeacherTransfer
from common.public_outputs import Targets
from common.tasks import Task
from server.aggregate import StudentAggregator, aggregate



class Exchange(Protocol):
    def outgoing(self, global_student: nn.Module) -> RecordDict: ...
    def check(self, content: RecordDict) -> str: ...
    def reply_bytes(self, content: RecordDict) -> int: ...
    def combine(self, replies: list[RecordDict], global_student: nn.Module, server_round: int,
                weights: np.ndarray | None = None) -> dict: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def _spec(model: nn.Module) -> P.ArraySpec:
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
    """Sites send DP-trained student weights; the server aggregates them coordinate-wise and, with
    exchange.server.distill_teacher, distills the result toward the teacher on the public and
    transfer inputs (FedDF's server step with the teacher as the ensemble; no privacy cost)."""

    def __init__(self, config: Config, task: Task, global_student: nn.Module):
        self.config = config.exchange
        self.seed = config.seed
        self.expected = _spec(global_student)
        self.max_bytes = int(self.config.max_reply_mb * 2**20)
        self.teacher = (TeacherTransfer(task, config.distill, self.config.server, seed=config.seed)
                        if self.config.server.distill_teacher else None)
        self.aggregator = StudentAggregator(method=self.config.aggregation, trim_fraction=self.config.trim_fraction,
                                            assumed_hostile=self.config.assumed_hostile,
                                            clip_norm=self.config.clip_update_norm)

    def outgoing(self, global_student: nn.Module) -> RecordDict:
        return RecordDict({P.ARRAYS: P.model_to_record(global_student)})

    def check(self, content: RecordDict) -> str:
        if P.ARRAYS not in content.array_records:
            return f"reply has no {P.ARRAYS!r} ArrayRecord"
        return (P.check_arrays(content[P.ARRAYS], self.expected, max_abs=self.config.max_abs_value, max_bytes=self.max_bytes)
                or check_count(content, self.config.weighting))

    def reply_bytes(self, content: RecordDict) -> int:
        return P.record_bytes(content[P.ARRAYS])

    def combine(self, replies: list[RecordDict], global_student: nn.Module, server_round: int,
                weights: np.ndarray | None = None) -> dict:
        start = {name: array.numpy() for name, array in P.model_to_record(global_student).items()}
        combined, done = self.aggregator([{name: array.numpy() for name, array in r[P.ARRAYS].items()} for r in replies],
                                         _weights(replies, self.config.weighting, weights), start)
        P.load_record(global_student, ArrayRecord({name: Array(np.asarray(combined[name]).astype(dtype))
                                                   for name, (_, dtype) in self.expected.items()}))
        if self.teacher is None:
            return done
        report = self.teacher.fit(global_student, seed=self.seed * 1000 + server_round)
        return {**done, "server_distill_epochs": report.epochs, "server_holdout_loss": report.holdout_loss}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # everything it carries is the global student

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the weights exchange keeps no state, got {sorted(state)}")


class LogitsExchange:
    """Sites send their students' outputs on the public inputs; the server aggregates and distills.

    The task's `PublicOutputs` say what those outputs are (a distribution per record or per
    next-token position). The consensus (optionally mixed with the teacher's) trains the
    global student on the public inputs. With broadcast=weights the sites start each round
    from that student (FedDF); with broadcast=logits they receive the consensus and keep
    their own students, which may differ per site (FedMD).
    """

    def __init__(self, config: Config, task: Task):
        self.config = config.exchange
        self.seed = config.seed
        self.outputs = task.public_outputs(self.config)
        self.device = task.device
        if self.config.choose_teacher_weight and self.outputs.row_labels is None:
            raise ConfigError(f"exchange.choose_teacher_weight judges the teacher's share on public labels, and "
                              f"task={config.task.name}'s public inputs have none: set exchange.choose_teacher_weight=false "
                              "and a fixed exchange.teacher_weight")
        self.max_bytes = int(self.config.max_reply_mb * 2**20)
        self.consensus: Targets | None = None  # last round's aggregate

    def outgoing(self, global_student: nn.Module) -> RecordDict:
        content = RecordDict()
        if self.config.broadcast == "weights":
            content[P.ARRAYS] = P.model_to_record(global_student)
        elif self.consensus is not None:
            content[P.CONSENSUS] = ArrayRecord({name: Array(t.numpy()) for name, t in self.consensus.items()})
        return content

    def check(self, content: RecordDict) -> str:
        if P.LOGITS not in content.array_records:
            return f"reply has no {P.LOGITS!r} ArrayRecord"
        record = content[P.LOGITS]
        return (P.check_arrays(record, self.outputs.expected(), max_abs=self.config.max_abs_value, max_bytes=self.max_bytes)
                or check_count(content, self.config.weighting)
                or self.outputs.check({name: array.numpy() for name, array in record.items()}))

    def reply_bytes(self, content: RecordDict) -> int:
        return P.record_bytes(content[P.LOGITS])

    def combine(self, replies: list[RecordDict], global_student: nn.Module, server_round: int,
                weights: np.ndarray | None = None) -> dict:
        combined, teacher_weight = self.outputs.combine(
            [{name: array.numpy() for name, array in r[P.LOGITS].items()} for r in replies],
            _weights(replies, self.config.weighting, weights),
            lambda stack, w: aggregate(stack, w, method=self.config.aggregation, trim_fraction=self.config.trim_fraction))
        seed = self.seed * 1000 + server_round
        report = self.outputs.fit(global_student, combined, self.config.server, seed=seed, device=self.device)
        self.consensus = combined  # sent down only once the global student has learned it
        return {"server_distill_epochs": report.epochs, "server_holdout_kl": report.holdout_loss,
                "teacher_weight": teacher_weight}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.consensus or {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.consensus = dict(state) or None


def build_exchange(config: Config, task: Task, global_student: nn.Module) -> Exchange:
    if config.exchange.mode == "weights":
        return WeightsExchange(config, task, global_student)
    return LogitsExchange(config, task)

