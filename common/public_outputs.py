"""What students say about the public inputs in the logits exchange: a site's reply, the server's
consensus, and the student fitted to it.

A classifier says one distribution over its classes per public record; a causal LM one
distribution over its output vocabulary per next-token position of the public records.
Both travel as rows of log-probabilities compressed by `common.compression` (a causal LM's
only as top-k: its dense rows would be hundreds of megabytes). The server decodes the
replies a slice of rows at a time, aggregates them coordinate-wise, mixes in the teacher,
and fits the global student to the result on the public inputs (no privacy cost).

The teacher's share of the mix is `exchange.teacher_weight`, or, with
`exchange.choose_teacher_weight` and a task whose public records carry labels (a causal
LM's next tokens), the share of `TEACHER_WEIGHTS` under which the mix gives a held-out slice
of those labels the lowest cross-entropy, chosen again each round.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable

import numpy as np
import torch
from torch import nn

from common import compression
from common.config import ConfigError, ExchangeConfig, ServerDistillConfig
from common.device import CPU
from common.losses import LOGITS, TOPK_IDS, TOPK_LOGPROBS, TokenDistillLoss, attention_mask
from common.payload import ArraySpec
from common.public_distill import DistillReport, distill_on_public, fit_on_public

LOGPROB_TOLERANCE = 1e-2  # float16 rounding of log-probabilities near 0
RECORDS_PER_FORWARD = 32
ROWS_PER_SLICE = 128  # rows decoded densely at once on the server: sites x rows x classes float64
TEACHER_WEIGHTS = tuple(i / 10 for i in range(11))  # the shares exchange.choose_teacher_weight tries
HOLDOUT_SEED = 0  # which public rows judge the mix: public facts only, the same every round

Aggregation = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (stack [S, ...], site weights [S]) -> [...]
Targets = dict[str, torch.Tensor]


class PublicOutputs:
    """Rows of distributions over `classes` that students output on the public inputs.

    Subclasses say what a row is: `_student_rows` (a student's logits for some records),
    `_teacher_log_probs` (the teacher's), `_targets` (a slice of the consensus as training
    targets), `target_spec` and `fit`. Both are handed values, and `teacher`, which computes the
    teacher's targets on the public inputs only when they are first mixed in; `row_labels`, the
    public label of every row where the task has them, lets the server choose the teacher's share.
    """

    def __init__(self, inputs: torch.Tensor, classes: int, rows: int, exchange: ExchangeConfig,
                 teacher: Callable[[], Targets], row_labels: torch.Tensor | None = None):
        self.inputs, self.classes, self.rows = inputs, classes, rows
        self.method, self.k, self.teacher_weight = exchange.compression, exchange.topk, exchange.teacher_weight
        self.choose_teacher_weight, self.holdout = exchange.choose_teacher_weight, exchange.server.holdout
        self._teacher = teacher
        self.row_labels = row_labels

    # --- at a site ---

    @torch.inference_mode()
    def encode(self, student: nn.Module) -> dict[str, np.ndarray]:
        """The student's compressed log-probabilities for every row: arrays for an ArrayRecord."""
        student.eval()
        parts = [compression.encode(self._student_rows(student, records), method=self.method, k=self.k)
                 for records in torch.arange(len(self.inputs)).split(RECORDS_PER_FORWARD)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    # --- at the server ---

    def expected(self) -> ArraySpec:
        """The (shape, dtype) of every array `encode` produces."""
        return compression.expected_arrays(method=self.method, k=self.k, rows=self.rows, classes=self.classes)

    def check(self, arrays: dict[str, np.ndarray]) -> str:
        """Why well-shaped arrays are still not log-probabilities over the classes, or ''."""
        if self.method == "topk":
            indices = arrays[compression.INDICES].astype(np.int64)
            if indices.size and indices.max() >= self.classes:
                return f"top-k indices must be < {self.classes} classes, got {indices.max()}"
            if (np.diff(np.sort(indices, axis=1), axis=1) == 0).any():
                return "top-k indices repeat a class within a row"
        values = arrays[compression.VALUES if self.method == "topk" else compression.LOGITS].astype(np.float64)
        mass = np.exp(values).sum(axis=1)
        if self.method != "topk" and values.size and (np.abs(mass - 1) > LOGPROB_TOLERANCE).any():
            return "a row's probabilities do not sum to 1: the reply is not log-probabilities"
        if values.size and (values.max() > LOGPROB_TOLERANCE or mass.max() > 1 + LOGPROB_TOLERANCE):
            return "the reply's values are not log-probabilities (a value above 0 or a row's mass above 1)"
        return ""

    def combine(self, replies: list[dict[str, np.ndarray]], weights: np.ndarray,
                aggregation: Aggregation) -> tuple[Targets, float]:
        """The consensus of the sites' rows with the teacher's mixed in, as targets, and the teacher's share."""
        share = self.chosen_teacher_weight(replies, weights, aggregation) if self.choose_teacher_weight else self.teacher_weight
        slices = [self._targets(self._mix(self._consensus(replies, rows, weights, aggregation), rows, share))
                  for rows in torch.arange(self.rows).split(ROWS_PER_SLICE)]
        return {name: torch.cat([part[name] for part in slices]) for name in slices[0]}, share

    def chosen_teacher_weight(self, replies: list[dict[str, np.ndarray]], weights: np.ndarray,
                              aggregation: Aggregation) -> float:
        """The share of TEACHER_WEIGHTS whose mix gives the public labels of a held-out slice of rows the
        lowest cross-entropy (the first of equals). Needs `row_labels`."""
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
        held_out = order[:max(1, round(self.holdout * self.rows))]
        losses = torch.zeros(len(TEACHER_WEIGHTS), dtype=torch.float64)
        for rows in held_out.split(ROWS_PER_SLICE):
            consensus, labels = self._consensus(replies, rows, weights, aggregation), self.row_labels[rows, None]
            for i, share in enumerate(TEACHER_WEIGHTS):
                losses[i] -= self._mix(consensus, rows, share).log_softmax(1).gather(1, labels).double().sum()
        return TEACHER_WEIGHTS[int(losses.argmin())]

    def _consensus(self, replies: list[dict[str, np.ndarray]], rows: torch.Tensor, weights: np.ndarray,
                   aggregation: Aggregation) -> torch.Tensor:
        """The sites' aggregated log-probabilities at `rows` [rows, C]."""
        # Log-probabilities, renormalised after float16 rounding: raw logits of different
        # students differ by per-row constants, which would dominate a median or mean.
        stack = np.stack([self._decode(reply, rows).numpy() for reply in replies])  # [S, rows, C]
        return torch.from_numpy(aggregation(stack, weights)).float()

    def _mix(self, consensus: torch.Tensor, rows: torch.Tensor, share: float) -> torch.Tensor:
        return consensus if share == 0 else (1 - share) * consensus + share * self._teacher_log_probs(rows)

    def _decode(self, arrays: dict[str, np.ndarray], rows: torch.Tensor) -> torch.Tensor:
        """Rows of wire arrays -> log-probabilities [rows, C]."""
        chosen = {name: array[rows.numpy()] for name, array in arrays.items()}
        return torch.log_softmax(compression.decode(chosen, method=self.method, classes=self.classes), dim=1)

    # --- what a row is ---

    def _student_rows(self, student: nn.Module, records: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _teacher_log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _targets(self, combined: torch.Tensor) -> Targets:
        raise NotImplementedError

    def target_spec(self) -> ArraySpec:
        """The (shape, dtype) of every consensus array a site receives (exchange.broadcast=logits)."""
        raise NotImplementedError

    def fit(self, student: nn.Module, targets: Targets, config: ServerDistillConfig, *, seed: int,
            device: torch.device = CPU) -> DistillReport:
        """Fit `student` in place to the consensus `targets` on the public inputs, on `device`."""
        raise NotImplementedError


class ClassOutputs(PublicOutputs):
    """One distribution over `classes` per public record; the consensus is dense soft labels."""

    def __init__(self, inputs: torch.Tensor, classes: int, exchange: ExchangeConfig, teacher: Callable[[], Targets]):
        super().__init__(inputs, classes, len(inputs), exchange, teacher)  # teacher() -> {LOGITS: [P, C]}

    def _student_rows(self, student: nn.Module, records: torch.Tensor) -> torch.Tensor:
        return student(self.inputs[records])

    @cached_property
    def _teacher_rows(self) -> torch.Tensor:
        return torch.log_softmax(self._teacher()[LOGITS].float(), dim=1)

    def _teacher_log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        return self._teacher_rows[rows]

    def _targets(self, combined: torch.Tensor) -> Targets:
        return {LOGITS: combined}

    def target_spec(self) -> ArraySpec:
        return {LOGITS: ((self.rows, self.classes), "float32")}

    def fit(self, student: nn.Module, targets: Targets, config: ServerDistillConfig, *, seed: int,
            device: torch.device = CPU) -> DistillReport:
        return distill_on_public(student, self.inputs, targets[LOGITS], config, seed=seed, device=device)


def class_outputs(task, exchange: ExchangeConfig) -> ClassOutputs:
    """A classifier task's `ClassOutputs`: its public inputs, its classes, its teacher's logits on them."""
    inputs = task.public_inputs()
    return ClassOutputs(inputs, task.num_classes, exchange, lambda: task.teacher_targets(inputs, (LOGITS,)))


class TokenOutputs(PublicOutputs):
    """One distribution over the output vocabulary per next-token position of the public records
    (where `labels` is not -100), sent and aggregated as top-k; the consensus is each
    position's top-k, learned with the token-level KD loss."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, vocabulary: int, exchange: ExchangeConfig,
                 teacher: Callable[[], Targets], teacher_vocabulary: int, unknown: int):
        if exchange.compression != "topk":
            raise ConfigError(f"a causal LM's public outputs travel as top-k next-token distributions, got "
                              f"exchange.compression={exchange.compression!r}: set exchange.compression=topk")
        if vocabulary > np.iinfo(np.uint16).max + 1:
            raise ConfigError(f"the student's output vocabulary of {vocabulary} tokens does not fit the uint16 "
                              "top-k indices of the logits exchange: use exchange=weights")
        self.positions = labels != -100  # [P, T]
        # teacher() -> the teacher's top-k {TOPK_LOGPROBS, TOPK_IDS} [P, T, k], ids as output ids
        super().__init__(inputs, vocabulary, int(self.positions.sum()), exchange, teacher, labels[self.positions])
        self.labels = labels
        self.teacher_vocabulary = teacher_vocabulary
        self.unknown = unknown  # the output id every token outside the output vocabulary maps to

    def _student_rows(self, student: nn.Module, records: torch.Tensor) -> torch.Tensor:
        labels = self.labels[records]
        return student(self.inputs[records], attention_mask=attention_mask(labels))[labels != -100]

    @cached_property
    def _teacher_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        top = self._teacher()
        return top[TOPK_LOGPROBS][self.positions].float(), top[TOPK_IDS][self.positions].long()  # [rows, k]

    def _teacher_log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        values, ids = (part[rows] for part in self._teacher_rows)
        # The teacher's mass outside its top-k is spread evenly over the rest of its vocabulary; the
        # unknown output token gets the share of every token outside the output vocabulary (and
        # the top-k tokens mapped to it), as it does in training.
        k = ids.shape[1]
        spread = (1 - values.exp().sum(1, keepdim=True)).clamp_min(0) / (self.teacher_vocabulary - k)  # [rows, 1]
        dense = spread.expand(len(ids), self.classes).clone()
        dense[:, self.unknown] += spread[:, 0] * (self.teacher_vocabulary - self.classes)
        dense.scatter_(1, ids, torch.where(ids == self.unknown, dense.gather(1, ids), 0.0))  # top-k tokens: no spread
        dense.scatter_add_(1, ids, values.exp())
        return torch.log_softmax(dense.clamp_min(1e-30).log(), dim=1)

    def _targets(self, combined: torch.Tensor) -> Targets:
        top = combined.topk(min(self.k, self.classes), dim=1)
        return {TOPK_LOGPROBS: top.values, TOPK_IDS: top.indices}

    def target_spec(self) -> ArraySpec:
        k = min(self.k, self.classes)
        return {TOPK_LOGPROBS: ((self.rows, k), "float32"), TOPK_IDS: ((self.rows, k), "int64")}

    def fit(self, student: nn.Module, targets: Targets, config: ServerDistillConfig, *, seed: int,
            device: torch.device = CPU) -> DistillReport:
        ids = targets[TOPK_IDS]
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.classes):
            raise ValueError(f"consensus token ids must lie in [0, {self.classes})")
        k = ids.shape[1]
        values = torch.zeros(*self.positions.shape, k)
        chosen = torch.full((*self.positions.shape, k), -1, dtype=torch.long)  # -1: no target at padding
        values[self.positions], chosen[self.positions] = targets[TOPK_LOGPROBS].float(), ids
        loss = TokenDistillLoss(temperature=config.temperature, alpha=1.0)
        data = torch.utils.data.TensorDataset(self.inputs, self.labels, values, chosen)
        return fit_on_public(student, data, lambda model, batch: loss(
            model(batch[0], attention_mask=attention_mask(batch[1])), batch[1], batch[2], batch[3]), config, seed=seed,
            device=device)
