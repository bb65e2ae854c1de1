"""The configuration a site runs: its own conf/ and site file first, then a run request's values.

A site composes the task a request names from its own `conf/task/` (part of the app it
pinned), with its site file's `task:` settings, cache folder and teacher on top: every path
and every setting that reads records is the site's. From the request it then takes only the
student, the distillation, the privacy asked for, the exchange, the rounds and the seed,
as typed values (common/request.py). No value of a request is composed by Hydra here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import TensorDataset

from common.config import CONF_DIR, Config, ConfigError, load_config
from common.policy import SitePolicy, policy_from
from common.request import RequestError, RunRequest
from common.tasks import Task, build_task


@functools.cache
def available_tasks() -> frozenset[str]:
    """The task names this app's conf/task/ holds."""
    return frozenset(path.stem for path in (CONF_DIR / "task").glob("*.yaml"))


def site_task_config(policy: SitePolicy, task: str, source: str) -> Config:
    """The site's configuration for `task` (a name checked against TASK_NAME) loaded by `source`
    (one of the site's task_sources), before any request: conf/task/<task>.yaml when the app
    holds it, the site file's task settings, its cache folder and teacher; conf's defaults for
    the rest. ConfigError when the site's own settings do not compose."""
    settings = {**policy.task, "name": task, "source": source}
    if policy.teacher_path is not None:
        settings["teacher"] = {**settings.get("teacher", {}), "path": policy.teacher_path}
    return _site_task_config(json.dumps({"task": settings, "cache_dir": policy.cache_dir, "device": policy.device},
                                        sort_keys=True), task)


@functools.lru_cache(maxsize=16)
def _site_task_config(values: str, task: str) -> Config:
    return load_config([f"task={task}"] if task in available_tasks() else [], values=json.loads(values))


def site_config(policy: SitePolicy, request: RunRequest) -> Config:
    """The configuration this site runs `request` with. RequestError when the request's values do
    not fit the site's task (the caller refuses without repeating them); ConfigError when the
    site's own settings do not compose, which is the same for every request."""
    base = site_task_config(policy, request.task, request.source)
    config = dataclasses.replace(base, student=request.student, distill=request.distill, privacy=request.privacy,
                                 exchange=request.exchange, rounds=request.rounds, seed=request.seed)
    try:
        config.validate()
    except ConfigError as err:
        raise RequestError(f"the request does not fit the site's task: {err}") from None
    return config


def read_records(task: Task, policy: SitePolicy) -> TensorDataset:
    """The site's own records (its data_path), read by `task` with the site's settings; ConfigError
    when they do not load, or when the site's delta is not below 1/N for them. A site does this
    the same way for every request: at `fedistill site` start, in site-check, and in a round
    only once every check that needs nothing of them has passed."""
    if policy.data_path is None:
        raise ConfigError("the site file sets no data_path: a deployed site trains on its own records")
    records = task.load_private(Path(policy.data_path).expanduser())
    policy.check_delta(len(records))
    return records


def check_records(policy: SitePolicy) -> list[str]:
    """Load the site's records for every built-in task it lists, as `fedistill site` does before it
    starts, and compute the teacher's outputs on them for the task's default objective (cached
    where that is costly, so that a round does not); a line per task, or ConfigError naming the
    task and the fix."""
    lines = []
    for source in policy.task_sources:
        if source not in available_tasks():
            lines.append(f"task source {source}: loaded when a run asks for it (not a task of conf/task/)")
            continue
        config = site_task_config(policy, source, source)
        task = build_task(config)
        try:
            records = read_records(task, policy)
        except ConfigError as err:
            raise ConfigError(f"the site's records do not load for task {source} (task_sources): {err}. Fix the "
                              f"records or the site file's task settings, or take {source} out of task_sources") from None
        task.teacher_targets(records.tensors[0], task.objective(config.distill).target_kinds)
        lines.append(f"task {source}: {len(records)} records from {policy.data_path}, the teacher's outputs on them ready")
    return lines


def simulated_site_policy(config: Config, site_overrides: Sequence[str] = ()) -> SitePolicy:
    """The one policy of every virtual site that `fedistill simulate` (and the benchmarks) run
    `config` on, from that command line, never from a request.

    In simulation the person at the command line is every site's administrator: by default
    the sites accept the run this command asks for, read their data with the task settings
    it composed (paths made absolute), keep their ledgers in the run directory, share its
    cache and hold no reply back (their records are a partition of data on this machine);
    `site.KEY=VALUE` says otherwise.
    """
    values = {"ledger_dir": str(Path(config.run_dir) / "ledger"), "cache_dir": str(config.cache_path),
              "task": config.task.site_settings(), "reply_after_s": 0,
              "hostile": dataclasses.asdict(config.federation.hostile), "device": config.device}
    if config.task.source not in policy_from().task_sources:
        values["task_sources"] = [*policy_from().task_sources, config.task.source]
    if config.privacy.enabled:
        values |= {"epsilon": config.privacy.epsilon, "delta": config.privacy.delta}
    try:
        given = OmegaConf.from_dotlist(list(site_overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"site.* overrides {site_overrides} cannot be read: {err}") from None
    policy = policy_from(OmegaConf.merge(values, given), origin="site.* on the command line")
    for key in ("ledger_dir", "cache_dir", "data_path"):
        if getattr(policy, key) is not None:
            setattr(policy, key, str(Path(getattr(policy, key)).expanduser().resolve()))
    return policy

