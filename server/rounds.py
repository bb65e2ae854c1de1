"""One federated round, whatever carries the messages: sample sites, send each what the exchange
says, read the replies, combine the valid ones into the global student.

`server.strategy` drives it with Flower's messages; `fedistill.inprocess` drives it with direct
calls to the site round, so the benchmarks measure the server's own round. Sites are sampled
from a participation plan drawn ahead, so that each sampled site is told how many rounds it has
left and can calibrate its noise to spend its budget on those. Each sampled site's outcome
(trained, refused, failed, invalid) is kept per round: a refusal or failure is data, and a reply
that fails the exchange's checks or holds anything a site may not release is dropped and counted.
A sampled site that sends nothing before the round's timeout has failed. A round with fewer valid
replies than `min_replies`, or whose combine fails, leaves the global student as it was and is
recorded as failed with its reason; after `max_failed_rounds` failed rounds in a row the run
stops (the rounds left are recorded as not run).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn

from common import payload as P
from common.config import Config
from common.request import encode, request_of
from common.site_registry import SiteRegistry
from common.tasks import Task
from server.exchange import Exchange, build_exchange

log = logging.getLogger(__name__)

TRAINED, REFUSED, FAILED, INVALID = "trained", "refused", "failed", "invalid"
NO_REPLY = "no reply before the round's timeout (federation.round_timeout)"
APP_REFUSED = "the site runs only apps it pinned (app_sha256), and this app is not one of them"


@dataclass
class SiteOutcome:
    """What one sampled site did in one round."""

    site: str
    node_id: int
    status: str  # TRAINED, REFUSED, FAILED or INVALID
    reason: str = ""
    code: str = ""
    train_loss: float | None = None
    epsilon_spent: float | None = None
    epsilon_budget: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None


@dataclass
class RoundOutcome:
    sampled: int = 0
    nodes: list[int] = field(default_factory=list)  # the sampled nodes
    failed: str = ""  # why the round left the global student as it was ("": it was combined)
    ran: bool = True  # False: not run, because the run had stopped
    bytes_down: int = 0
    bytes_up: int = 0
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # from sending the round's messages to the new global student
    aggregation_seconds: float = 0.0  # combining the accepted replies into it
    sites: list[SiteOutcome] = field(default_factory=list)
    server: dict = field(default_factory=dict)  # what the exchange reports of its combine step
    reply_items: set[str] = field(default_factory=set)  # what the trained replies held, for the record

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.sites)


class ParticipationPlan:
    """Which rounds each site trains in, drawn ahead: each round samples `fraction` of the sites
    (at least `min_sites`), as FedAvg does, but the whole run's draw is known in advance.

    It is redrawn for the remaining rounds whenever the connected sites change.
    """

    def __init__(self, *, rounds: int, fraction: float, min_sites: int, seed: int):
        self.rounds, self.fraction, self.min_sites, self.seed = rounds, fraction, min_sites, seed
        self.nodes: list[int] = []
        self.sampled: dict[int, list[int]] = {}  # round -> node ids

    def sample(self, server_round: int, connected: list[int]) -> dict[int, int]:
        """This round's sampled nodes -> the rounds each has left in the run, this one included."""
        if sorted(connected) != self.nodes:
            self.nodes = sorted(connected)
            rng = random.Random(f"{self.seed}-{server_round}-{len(self.nodes)}")
            size = min(len(self.nodes), max(int(len(self.nodes) * self.fraction), self.min_sites))
            for r in range(server_round, self.rounds + 1):
                self.sampled[r] = rng.sample(self.nodes, size)
        later = [self.sampled[r] for r in range(server_round, self.rounds + 1)]
        return {node: sum(node in nodes for nodes in later) for node in self.sampled[server_round]}


class RoundEngine:
    """`configure(round, connected)` says what each sampled node gets; `aggregate(round, replies)`
    reads what came back and updates `global_student`. `rounds[r]` holds round r's outcome.

    `allowed_items` is everything a site's reply may hold (common.payload's release lists). A round
    is combined only from at least `min_replies` valid replies; after `max_failed_rounds` failed
    rounds in a row (0: never) no more rounds are run. With a `registry`, a site is named by the
    name the coordinator registered its node under, whatever its reply says.
    """

    def __init__(self, *, exchange: Exchange, global_student: nn.Module, plan: ParticipationPlan,
                 allowed_items: set[str], assets: dict[str, int | str], request: str,
                 min_replies: int = 1, max_failed_rounds: int = 0, registry: SiteRegistry | None = None):
        self.min_replies, self.max_failed_rounds = min_replies, max_failed_rounds
        self.exchange = exchange
        self.global_student = global_student
        self.plan = plan
        self.allowed_items = allowed_items
        self.assets = assets  # the teacher and public set every site must hold (common.payload.asset_manifest)
        self.request = request  # the run request every site gets (common.request.encode)
        self.registry = registry
        self.rounds: dict[int, RoundOutcome] = {}
        self.nodes_seen: set[int] = set()  # every node connected at some round: the sites of this run

    @classmethod
    def for_run(cls, config: Config, task: Task, global_student: nn.Module) -> RoundEngine:
        """The engine of the run `config` describes: its exchange, participation plan, release list,
        request and limits."""
        return cls(
            exchange=build_exchange(config, task, global_student),
            global_student=global_student,
            plan=ParticipationPlan(rounds=config.rounds, fraction=config.federation.fraction_train,
                                   min_sites=config.federation.min_sites, seed=config.seed),
            allowed_items=set(P.released_items(mode=config.exchange.mode, weighting=config.exchange.weighting,
                                               dp=config.privacy.enabled)),
            assets=P.asset_manifest(task),
            request=encode(request_of(config)),
            min_replies=config.federation.min_replies,
            max_failed_rounds=config.federation.max_failed_rounds,
            registry=SiteRegistry.from_environment(),
        )

    def configure(self, server_round: int, connected: list[int]) -> dict[int, RecordDict]:
        """Each node sampled this round -> the content it is sent (none once the run has stopped)."""
        if self.stopped:
            self.rounds[server_round] = RoundOutcome(ran=False, failed=f"not run: the {self.max_failed_rounds} rounds "
                                                                            "before it failed (federation.max_failed_rounds)")
            return {}
        self.nodes_seen.update(connected)
        sampled = self.plan.sample(server_round, connected)
        content = round_request(self.exchange, self.global_student, server_round, self.assets, self.request)
        self.rounds[server_round] = RoundOutcome(sampled=len(sampled), nodes=sorted(sampled),
                                                 bytes_down=len(sampled) * content_bytes(content))
        return {node: for_site(content, rounds_left) for node, rounds_left in sampled.items()}

    @property
    def stopped(self) -> bool:
        """Whether the last `max_failed_rounds` rounds all failed, so that no more are run."""
        last = [self.rounds[r] for r in sorted(self.rounds)[-self.max_failed_rounds:]] if self.max_failed_rounds else []
        return len(last) == self.max_failed_rounds > 0 and all(o.failed for o in last)

    def aggregate(self, server_round: int, replies: list[tuple[int, RecordDict | str]],
                  weights: dict[int, float] | None = None) -> int:
        """Read each node's reply (its content, or the error that came instead) and combine the
        valid ones; returns how many were combined (0: the global student is unchanged).

        `weights` (node -> weight) overrides the exchange's weighting: only an in-process
        reference that knows the record counts no DP site sends may give it.
        """
        outcome = self.rounds.setdefault(server_round, RoundOutcome())
        if outcome.failed:  # not run
            return 0
        replied = {node_id for node_id, _ in replies}
        replies = [*replies, *((node, NO_REPLY) for node in outcome.nodes if node not in replied)]
        accepted, nodes = [], []
        names = self.registry.names() if self.registry else {}
        for node_id, reply in replies:
            site = (error_outcome(reply, node_id) if isinstance(reply, str)
                    else read_content(reply, node_id, self.exchange, self.allowed_items))
            site.site = names.get(node_id, site.site)
            outcome.sites.append(site)
            if site.status == TRAINED:
                outcome.bytes_up += self.exchange.reply_bytes(reply)
                outcome.reply_items |= P.reply_items(reply)
                accepted.append(reply)
                nodes.append(node_id)
            else:
                log.warning("Round %d: %s (node %d) %s: %s", server_round, site.site, site.node_id, site.status, site.reason)
        if len(accepted) < self.min_replies:
            outcome.failed = (f"{len(accepted)} valid replies from {outcome.sampled} sampled sites, fewer than "
                              f"federation.min_replies={self.min_replies}")
            log.warning("Round %d failed: %s; the global student is unchanged", server_round, outcome.failed)
            accepted = []
        if accepted:
            combine_start = time.perf_counter()
            previous = P.model_to_record(self.global_student)
            given = None if weights is None else np.array([weights[node] for node in nodes], dtype=np.float64)
            try:
                outcome.server = self.exchange.combine(accepted, self.global_student, server_round, weights=given)
            except Exception as err:  # keep the previous global student and the run going
                log.error("Round %d: combining %d replies failed: %r", server_round, len(accepted), err)
                P.load_record(self.global_student, previous)  # a combine may fail after changing it
                outcome.server = {"error": repr(err)}
                outcome.failed = f"combining {len(accepted)} replies failed: {err!r}"
                accepted = []
            outcome.aggregation_seconds = time.perf_counter() - combine_start
        outcome.seconds = time.perf_counter() - outcome.started
        return len(accepted)


def error_outcome(error: str, node_id: int) -> SiteOutcome:
    """A node whose app sent an error: a site that refused to run an app it had not pinned, or a failure."""
    if P.APP_NOT_PINNED in error:
        return SiteOutcome(f"node-{node_id}", node_id, REFUSED, reason=APP_REFUSED, code=P.REFUSAL_APP)
    return SiteOutcome(f"node-{node_id}", node_id, FAILED, reason=first_line(error))


def first_line(error: str, limit: int = 200) -> str:
    """An error's first line, at most `limit` characters: what it was, not which process or node
    (a Ray error goes on with the actor's id and PID), so that failures are counted by reason."""
    line = error.strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def round_request(exchange: Exchange, global_student: nn.Module, server_round: int,
                  assets: dict[str, int | str], request: str) -> RecordDict:
    """What every sampled site receives this round: the exchange's content, the run request, the
    round number and the assets."""
    content = exchange.outgoing(global_student)
    content[P.CONFIG] = ConfigRecord({**assets, P.SERVER_ROUND: server_round, P.REQUEST: request})
    return content


def for_site(content: RecordDict, rounds_left: int) -> RecordDict:
    """`content` for one site, told how many rounds it has left (the arrays are shared, not copied)."""
    site_content = RecordDict(dict(content.array_records))
    site_content[P.CONFIG] = ConfigRecord({**content[P.CONFIG], P.ROUNDS_LEFT: rounds_left})
    return site_content


def content_bytes(content: RecordDict) -> int:
    return sum(P.record_bytes(r) for r in content.array_records.values())


def read_content(content: RecordDict, node_id: int, exchange: Exchange, allowed: set[str]) -> SiteOutcome:
    """A site's reply as an outcome; a trained reply that fails the exchange's checks, or holds an
    item a site may not release, is INVALID."""
    try:
        site = _outcome(content, node_id)
    except (TypeError, ValueError, OverflowError) as err:
        return SiteOutcome(f"node-{node_id}", node_id, INVALID, reason=f"reply metadata is unreadable: {err}")
    extra = sorted(P.reply_items(content) - allowed)
    if extra:
        site.status, site.reason = INVALID, f"reply holds items a site may not release: {extra}"
    elif site.status == TRAINED:
        try:
            problem = exchange.check(content)
        except Exception as err:  # a malformed reply must not stop the round
            problem = f"reply could not be checked: {err!r}"
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
        code=str(status.get(P.CODE, "")),
        train_loss=_float(metrics.get(P.TRAIN_LOSS)),
        epsilon_spent=_float(metrics.get(P.EPSILON_SPENT)),
        epsilon_budget=_float(metrics.get(P.EPSILON_BUDGET)),
        noise_multiplier=_float(metrics.get(P.NOISE_MULTIPLIER)),
        sample_rate=_float(metrics.get(P.SAMPLE_RATE)),
    )


def _float(value) -> float | None:
    return None if value is None else float(value)
