"""The round loop's two steps for DP distillation: send what the exchange says, combine what is valid.

Flower's `Strategy.start()` runs the rounds; this FedAvg subclass only overrides the
configure and aggregate steps. Each sampled site's outcome (trained, refused, failed,
invalid) is kept per round: a refusal or failure is data, and a reply that fails the
exchange's checks is dropped and counted, never combined.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from common import payload as P
from server.exchange import Exchange

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
    seconds: float = 0.0  # from sending the round's messages to the new global student
    sites: list[SiteOutcome] = field(default_factory=list)
    server: dict = field(default_factory=dict)  # what the exchange reports of its combine step

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.sites)


class DistillStrategy(FedAvg):
    """Samples sites like FedAvg; `exchange` decides what is sent and how replies are combined.

    The global student is a module owned by the server; `rounds[r]` holds round r's outcome.
    """

    def __init__(self, *, exchange: Exchange, global_student: nn.Module, fraction_train: float, min_sites: int):
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # the server evaluates the global student itself
            min_train_nodes=min_sites,
            min_available_nodes=min_sites,
            weighted_by_key=P.NUM_EXAMPLES,
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
        )
        self.exchange = exchange
        self.global_student = global_student
        self.rounds: dict[int, RoundOutcome] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # FedAvg samples the nodes; the content is the exchange's.
        sampled = [m.metadata.dst_node_id for m in super().configure_train(server_round, arrays, config, grid)]
        content = round_request(self.exchange, self.global_student, server_round)
        self.rounds[server_round] = RoundOutcome(sampled=len(sampled), bytes_down=len(sampled) * content_bytes(content))
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in sampled]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcome = self.rounds.setdefault(server_round, RoundOutcome())
        accepted = []
        for msg in replies:
            site = self.read_reply(msg)
            outcome.sites.append(site)
            if site.status == TRAINED:
                outcome.bytes_up += self.exchange.reply_bytes(msg.content)
                accepted.append(msg.content)
            else:
                log.warning("Round %d: %s (node %d) %s: %s", server_round, site.site, site.node_id, site.status, site.reason)
        if accepted:
            try:
                outcome.server = self.exchange.combine(accepted, self.global_student, server_round)
            except Exception as err:  # keep the previous global student and the run going
                log.error("Round %d: combining %d replies failed: %r", server_round, len(accepted), err)
                outcome.server = {"error": repr(err)}
                accepted = []
        outcome.seconds = time.perf_counter() - outcome.started
        if not accepted:
            return None, None
        total = sum(s.num_examples for s in outcome.sites if s.status == TRAINED)
        return P.model_to_record(self.global_student), MetricRecord({P.NUM_EXAMPLES: total})

    def read_reply(self, msg: Message) -> SiteOutcome:
        node_id = msg.metadata.src_node_id
        if msg.has_error():
            return SiteOutcome(f"node-{node_id}", node_id, FAILED, reason=msg.error.reason)
        return read_content(msg.content, node_id, self.exchange)


def round_request(exchange: Exchange, global_student: nn.Module, server_round: int) -> RecordDict:
    """What every sampled site receives this round: the exchange's content and the round number."""
    content = exchange.outgoing(global_student)
    round_config = content.config_records.get(P.CONFIG, ConfigRecord())
    round_config[P.SERVER_ROUND] = server_round
    content[P.CONFIG] = round_config
    return content


def content_bytes(content: RecordDict) -> int:
    return sum(P.record_bytes(r) for r in content.array_records.values())


def read_content(content: RecordDict, node_id: int, exchange: Exchange) -> SiteOutcome:
    """A site's reply as an outcome; a trained reply that fails the exchange's checks is INVALID."""
    try:
        site = _outcome(content, node_id)
    except (TypeError, ValueError, OverflowError) as err:
        return SiteOutcome(f"node-{node_id}", node_id, INVALID, reason=f"reply metadata is unreadable: {err}")
    if site.status == TRAINED:
        try:
            problem = exchange.check(content)
        except Exception as err:  # a malformed reply must not stop the round
            problem = f"reply could not be checked: {err!r}"
        if not problem and site.num_examples <= 0:
            problem = f"reply metrics must carry {P.NUM_EXAMPLES!r} > 0"
        if problem:
            site.status, site.reason = INVALID, problem
    return site


def _outcome(content: RecordDict, node_id: int) -> SiteOutcome:
    status = content.config_records.get(P.CONFIG, ConfigRecord())
    metrics = content.metric_records.get(P.METRICS, MetricRecord())
    return SiteOutcome(
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


def _float(value) -> float | None:
    return None if value is None else float(value)
