"""Flower's side of the round: a FedAvg whose configure and aggregate steps hand over to the round engine.

Flower's `Strategy.start()` runs the rounds, waits for sites and carries the messages; what is
sent and how replies are combined is `server.rounds.RoundEngine`, which the in-process
benchmarks drive too.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common import payload as P
from server.rounds import RoundEngine


class DistillStrategy(FedAvg):
    """Samples sites like FedAvg (at least the plan's `min_sites` connected); `engine` decides what
    is sent and how replies are combined, and keeps each round's outcome."""

    def __init__(self, *, engine: RoundEngine):
        super().__init__(
            fraction_train=engine.plan.fraction,
            fraction_evaluate=0.0,  # the server evaluates the global student itself
            min_train_nodes=engine.plan.min_sites,
            min_available_nodes=engine.plan.min_sites,
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
        )
        self.engine = engine

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)  # waits for enough sites
        contents = self.engine.configure(server_round, connected)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node, content in contents.items()]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        combined = self.engine.aggregate(server_round, [
            (msg.metadata.src_node_id, msg.error.reason if msg.has_error() else msg.content) for msg in replies
        ])
        if not combined:
            return None, None
        return P.model_to_record(self.engine.global_student), MetricRecord({"sites-combined": combined})
