"""FedAvg over DP-distilled students, keeping each site's outcome (trained, refused, failed)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common import payload as P

log = logging.getLogger(__name__)

TRAINED, REFUSED, FAILED, INVALID = "trained", "refused", "failed", "invalid"


@dataclass
class SiteOutcome:
    """What one sampled site did in one round."""

    site: str
    node_id: int
    status: str  # TRAINED, REFUSED, FAILED or INVALID
    reason: str = ""
    num_examples: int = 0
    train_loss: float | None = None
    epsilon_spent: float | None = None
    epsilon_budget: float | None = None
    noise_multiplier: float | None = None


@dataclass
class RoundOutcome:
    sampled: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # from sending the round's messages to the aggregate
    sites: list[SiteOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.sites)


class DistillFedAvg(FedAvg):
    """FedAvg weighted by examples; refusals and failures are data, bad replies never averaged in.

    `rounds[r]` holds the outcome of round r for the run directory and the summary.
    """

    def __init__(self, *, fraction_train: float, min_sites: int):
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # the server evaluates the global student itself
            min_train_nodes=min_sites,
            min_available_nodes=min_sites,
            weighted_by_key=P.NUM_EXAMPLES,
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
        )
        self.rounds: dict[int, RoundOutcome] = {}
        self._global_shapes: dict[str, tuple[int, ...]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global_shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        self.rounds[server_round] = RoundOutcome(
            sampled=len(messages), bytes_down=len(messages) * P.record_bytes(arrays)
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcome = self.rounds.setdefault(server_round, RoundOutcome())
        accepted = []
        for msg in replies:
            site = self._read_reply(msg)
            outcome.sites.append(site)
            if site.status == TRAINED:
                outcome.bytes_up += P.record_bytes(msg.content[P.ARRAYS])
                accepted.append(msg.content)
            else:
                log.warning("Round %d: %s (node %d) %s: %s", server_round, site.site, site.node_id, site.status, site.reason)
        outcome.seconds = time.perf_counter() - outcome.started
        if not accepted:
            return None, None
        arrays = aggregate_arrayrecords(accepted, P.NUM_EXAMPLES)
        total = sum(s.num_examples for s in outcome.sites if s.status == TRAINED)
        loss = sum(s.train_loss * s.num_examples for s in outcome.sites if s.status == TRAINED) / total
        return arrays, MetricRecord({P.TRAIN_LOSS: loss, P.NUM_EXAMPLES: total})

    def _read_reply(self, msg: Message) -> SiteOutcome:
        node_id = msg.metadata.src_node_id
        if msg.has_error():
            return SiteOutcome(f"node-{node_id}", node_id, FAILED, reason=msg.error.reason)
        content = msg.content
        status = content.config_records.get(P.CONFIG, ConfigRecord())
        metrics = content.metric_records.get(P.METRICS, MetricRecord())
        site = SiteOutcome(
            site=str(status.get(P.SITE, f"node-{node_id}")),
            node_id=node_id,
            status=REFUSED if status.get(P.STATUS) == P.STATUS_REFUSED else TRAINED,
            reason=str(status.get(P.REASON, "")),
            num_examples=int(metrics.get(P.NUM_EXAMPLES, 0)),
            train_loss=_float(metrics.get(P.TRAIN_LOSS)),
            epsilon_spent=_float(metrics.get(P.EPSILON_SPENT)),
            epsilon_budget=_float(metrics.get(P.EPSILON_BUDGET)),
            noise_multiplier=_float(metrics.get(P.NOISE_MULTIPLIER)),
        )
        if site.status == TRAINED:
            problem = self._check_weights(content)
            if problem:
                site.status, site.reason = INVALID, problem
        return site

    def _check_weights(self, content) -> str:
        """Why a trained reply cannot be averaged in, or '' if it can."""
        if P.ARRAYS not in content.array_records:
            return f"reply has no {P.ARRAYS!r} ArrayRecord"
        shapes = {k: tuple(v.shape) for k, v in content[P.ARRAYS].items()}
        if shapes != self._global_shapes:
            return f"student tensors {shapes} do not match the global student {self._global_shapes}"
        if not all(np.isfinite(v.numpy()).all() for v in content[P.ARRAYS].values()):
            return "student tensors hold NaN or infinite values"
        if P.NUM_EXAMPLES not in content.metric_records.get(P.METRICS, {}):
            return f"reply metrics lack {P.NUM_EXAMPLES!r}"
        return ""


def _float(value) -> float | None:
    return None if value is None else float(value)
