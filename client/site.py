"""A site: its task built with its own settings, its records read once, and its ledger.

The records are read with the site's settings only (its file's data_path and task settings,
common/site_config.py), never with a request's, and only once a round has passed every
check that does not need them: nothing a site answers before that depends on them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common import payload as P
from common.config import Config
from common.policy import SitePolicy
from common.privacy import Budget, DataFingerprint, PrivacyLedger, file_records, records_digest
from common.public_outputs import PublicOutputs
from common.site_config import read_records
from common.step_plan import size_class
from common.tasks import Task, build_task


@dataclass(frozen=True)
class Site:
    """One site for one request: its configuration (common.site_config), policy and task; its
    records and the teacher's targets on them are read on first use, once."""

    name: str
    config: Config
    policy: SitePolicy
    task: Task
    index: int           # the partition this site plays in simulation (0 for a deployed site)
    num_partitions: int

    @property
    def ledger_dir(self) -> Path:
        return self.policy.ledger_root / self.name

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.ledger_dir, budget=Budget(self.policy.epsilon, self.policy.delta), data=self.fingerprint)

    @cached_property
    def assets(self) -> dict[str, int | str]:
        """The teacher and public set this site holds, as the server announces its own."""
        return P.asset_manifest(self.task)

    @cached_property
    def outputs(self) -> PublicOutputs:
        """What this site's student says about the public inputs (exchange=logits)."""
        return self.task.public_outputs(self.config.exchange)

    def new_student(self) -> nn.Module:
        """This site's student: the global architecture, or its own with different students per site."""
        torch.manual_seed(self.config.seed * 1000 + self.index)
        return self.task.student(self.config.exchange.student_for(self.index, self.config.student))

    @cached_property
    def records(self) -> TensorDataset:
        """(inputs, labels): the site's own records (its policy's data_path), or in simulation its
        share of the task's built-in data. ConfigError when they do not load, or when the site's
        delta is not below 1/N for them."""
        if self.policy.data_path is not None:
            return read_records(self.task, self.policy)
        return self.task.private_data(self.index, self.num_partitions)

    @property
    def plan_size(self) -> int:
        """The size class the step plan is chosen for (common/step_plan.py): the one the site's file
        declares; else, on the built-in partition (public, bundled data), its own share's; else the
        default. Never a count of records of the site's own."""
        if self.policy.size_class is not None or self.policy.data_path is not None:
            return size_class(self.policy.size_class)
        return size_class(len(self.records))

    @cached_property
    def fingerprint(self) -> DataFingerprint:
        if self.policy.data_path is not None:
            return file_records(self.records)
        dataset, partition = self.task.partition_identity(self.num_partitions)
        return DataFingerprint(dataset=dataset, partition=partition, records=records_digest(self.records),
                               copies=self.config.task.sites_per_record)

    @cached_property
    def objective(self) -> nn.Module:
        """The task's local loss; reads the targets in `data` by its target_kinds."""
        return self.task.objective(self.config.distill)

    @cached_property
    def data(self) -> TensorDataset:
        """(inputs, labels, *the teacher's targets): computed once per site, which halves a KD step's cost."""
        inputs, labels = self.records.tensors
        targets = self.task.teacher_targets(inputs, self.objective.target_kinds)
        return TensorDataset(inputs, labels, *(targets[kind] for kind in self.objective.target_kinds))


def site_name(partition_id: int) -> str:
    return f"site-{partition_id}"


def load_site(config: Config, policy: SitePolicy, partition_id: int, num_partitions: int) -> Site:
    """The site this process plays for this configuration, built once per process and kept among
    the last `CACHED_SITES` used: a simulation worker plays many sites in turn, and its memory
    must not grow with their number (a site holds only its own slice). Sites of one
    configuration share one task object (teacher, public set), the last two kept."""
    config_key = json.dumps(dataclasses.asdict(config), sort_keys=True)
    key = (config_key, json.dumps(dataclasses.asdict(policy), sort_keys=True), partition_id, num_partitions)
    if key in _SITES:
        _SITES[key] = _SITES.pop(key)  # the most recently used last
    else:
        if config_key not in _TASKS:
            while len(_TASKS) >= 2:  # a dropped task takes its sites with it
                dropped = _TASKS.pop(next(iter(_TASKS)))
                for other in [k for k, site in _SITES.items() if site.task is dropped]:
                    del _SITES[other]
            _TASKS[config_key] = build_task(config)
        while len(_SITES) >= CACHED_SITES:
            del _SITES[next(iter(_SITES))]
        name = policy.name or site_name(partition_id)
        _SITES[key] = Site(name, config, policy, _TASKS[config_key], partition_id, num_partitions)
    return _SITES[key]


CACHED_SITES = 32
_SITES: dict[tuple[str, str, int, int], Site] = {}
_TASKS: dict[str, Task] = {}


def clear_sites() -> None:
    """Forget every site and task this process built (tests)."""
    _SITES.clear()
    _TASKS.clear()
