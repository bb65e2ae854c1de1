"""Federations in one process, without Flower's processes: the same site round
(`client.round.train_round`: admission's config, ledger, calibration, Opacus DP-SGD), the same
reply checks and the same exchange (`server.exchange`) as the apps, for `fedistill frontier`
and the benchmarks, where many settings and seeds must fit in one run. The person running it
is every virtual site's administrator, as in `fedistill simulate`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

import torch
from flwr.app import RecordDict
from torch import nn

from client.round import train_round
from client.site import Site, load_site
from common.config import Config
from common.evaluation import Evaluator, Scores
from common.public_distill import OBJECTIVE_SETTINGS, DistillReport, initial_student
from common.request import request_of
from common.site_config import simulated_site_policy, site_config
from common.tasks import Task, build_task
from server.rounds import TRAINED, RoundEngine


def sites_of(config: Config) -> list[Site]:
    """The virtual sites of one federation, as `fedistill simulate` makes them: the run's
    request admitted under the policy it writes for them (a fresh ledger in the run directory)."""
    policy = simulated_site_policy(config, [] if config.privacy.enabled else ["require_dp=false"])
    site_run = site_config(policy, request_of(config))
    return [load_site(site_run, policy, i, config.sites) for i in range(config.sites)]


def federate(config: Config, *, weight_by_count: bool = False, dp_seed: int | None = None,
             also: Callable[[Task, nn.Module], Scores] | None = None, sites: list[Site] | None = None,
             on_reply: Callable[[int, RecordDict, RecordDict], None] | None = None) -> tuple[Scores, dict]:
    """Run `config.rounds` rounds in-process with the server's round engine; returns the final
    evaluation and what crossed the wire.

    `weight_by_count` combines sites in proportion to their record counts, which no site
    sends under DP: a non-private reference for the cost of counting sites equally. `dp_seed`
    seeds every site's DP batches and noise (tests); None draws them from the operating system.
    `also(task, global student)` adds scores of its own (the attack benchmark's backdoor rate).
    `sites` replaces `sites_of(config)` (the audit's planted site); `on_reply(node, content, reply)`
    sees every reply as it is sent, beside what the site was sent.
    """
    sites = sites or sites_of(config)  # node id = site index
    states = [RecordDict() for _ in sites]  # each site's context.state
    task = task_of(config)
    student = copy.deepcopy(start_of(config)[0])
    engine = RoundEngine.for_run(config, task, student)
    counts = {node: float(len(site.data)) for node, site in enumerate(sites)}
    for server_round in range(1, config.rounds + 1):
        contents = engine.configure(server_round, list(counts))
        replies = [(node, train_round(sites[node], content, states[node], server_round=server_round, run="bench",
                                      generator=None if dp_seed is None else
                                      torch.Generator().manual_seed(dp_seed * 1_000_000 + server_round * 1000 + node)))
                   for node, content in contents.items()]
        for node, reply in replies if on_reply else ():
            on_reply(node, contents[node], reply)
        engine.aggregate(server_round, replies, weights=counts if weight_by_count else None)
    outcomes = engine.rounds.values()
    trained = sum(o.count(TRAINED) for o in outcomes)
    spent = {s.site: s.epsilon_spent for o in outcomes for s in o.sites}  # each site's last report
    wire = {"bytes_up_per_site_round": sum(o.bytes_up for o in outcomes) / max(trained, 1),
            "bytes_down_per_site_round": sum(o.bytes_down for o in outcomes) / max(sum(o.sampled for o in outcomes), 1)}
    scores = evaluator(task)(student) | (also(task, student) if also else {})
    return scores, {"epsilon": list(spent.values()), "epsilon_by_site": spent, **wire}


@functools.lru_cache(maxsize=8)
def evaluator(task: Task) -> Evaluator:
    return task.evaluator()


class KeyedCache:
    """The last `size` objects made, by a key of the typed settings they depend on."""

    def __init__(self, size: int):
        self.size, self.items = size, {}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self.items:
            if len(self.items) >= self.size:
                self.items.pop(next(iter(self.items)))
            self.items[key] = make()
        return self.items[key]


_tasks, _starts = KeyedCache(8), KeyedCache(4)


def task_key(config: Config) -> tuple:
    """What a task object depends on: task, distillation and student settings (the student's decide
    which distillation terms are valid), seed and cache."""
    return repr(config.task), repr(config.student), repr(config.distill), config.seed, str(config.cache_path)


def task_of(config: Config) -> Task:
    """One task object per `task_key`, so data and teacher load once per benchmark."""
    return _tasks.get(task_key(config), lambda: build_task(config))


def start_of(config: Config) -> tuple[nn.Module, DistillReport | None]:
    """The global student before round 1 (warm-started where the config says), once per task,
    student, objective (not the DP step's settings), server-distillation settings and seed."""
    objective = repr([getattr(config.distill, key) for key in OBJECTIVE_SETTINGS])
    key = (repr(config.task), repr(config.student), repr(config.exchange.server), objective, config.seed,
           str(config.cache_path))
    return _starts.get(key, lambda: initial_student(task_of(config), config))


def public_only(config: Config) -> Scores:
    """What the coordinator gets without the sites: the student it distills alone from the teacher
    on the public and transfer inputs, which is where the federation starts (its warm start)."""
    if not config.exchange.server.warm_start:
        server = dataclasses.replace(config.exchange.server, warm_start=True)
        config = dataclasses.replace(config, exchange=dataclasses.replace(config.exchange, server=server))
    return evaluator(task_of(config))(copy.deepcopy(start_of(config)[0]))
