"""Flower's side of the round: a FedAvg whose configure and aggregate steps hand over to the round engine.

Flower's `Strategy.start()` runs the rounds, waits for sites and carries the messages; what is
sent and how replies are combined is `server.rounds.RoundEngine`, which the in-process
benchmarks drive too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import payload as P
from server.rounds import RoundEngine

log = logging.getLogger(__name__)


class DistillStrategy(FedAvg):
    """Samples sites like FedAvg (waiting up to `wait_s` for the plan's `min_sites` to be connected,
    then going on with those that are); `engine` decides what is sent and how replies are combined,
    and keeps each round's outcome. A resumed run has `rounds_done` already: Flower counts its
    rounds from 1, the engine from `rounds_done + 1`."""

    def __init__(self, *, engine: RoundEngine, wait_s: float, rounds_done: int = 0):
        super().__init__(
            fraction_train=engine.plan.fraction,
            fraction_evaluate=0.0,  # the server evaluates the global student itself
            min_train_nodes=engine.plan.min_sites,
            min_available_nodes=engine.plan.min_sites,
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
        )
        self.engine = engine
        self.wait_s = wait_s
        self.rounds_done = rounds_done
        self._sent: list[Message] = []  # this round's messages: Flower gives them their ids as it pushes them

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        connected = [] if self.engine.stopped else connected_sites(grid, self.min_available_nodes, self.wait_s)
        contents = self.engine.configure(server_round + self.rounds_done, connected)
        self._sent = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                      for node, content in contents.items()]
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # By the message each replies to: an error the SuperLink sends for a node that stopped
        # answering comes from the SuperLink's own node id, not the site's.
        node_of = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in self._sent}
        combined = self.engine.aggregate(server_round + self.rounds_done, [
            (node_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id),
             msg.error.reason if msg.has_error() else msg.content) for msg in replies
        ])
        if not combined:
            return None, None
        return P.model_to_record(self.engine.global_student), MetricRecord({"sites-combined": combined})


def connected_sites(grid: Grid, minimum: int, wait_s: float) -> list[int]:
    """The connected nodes, once at least `minimum` are or `wait_s` seconds have passed (Flower's own
    sampling waits for ever, and a site that died may never come back)."""
    deadline, said = time.monotonic() + wait_s, 0.0
    while len(nodes := list(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
        if time.monotonic() - said > 30:
            log.info("Waiting for sites to connect: %d of %d", len(nodes), minimum)
            said = time.monotonic()
        time.sleep(1)
    if len(nodes) < minimum:
        log.warning("Only %d of federation.min_sites=%d sites connected after %.0f s; the round goes on with them",
                    len(nodes), minimum, wait_s)
    return nodes
