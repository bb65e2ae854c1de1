"""A site's privacy policy: what a site will do with its private records, read on its side only.

A run reaches a site as a *request* (common/request.py) from whoever submits the run. The
site checks it against its policy and refuses what lies outside: the server cannot make a
site train without DP, spend more epsilon, account at a larger delta or run more rounds, nor
import code the site has not listed. Everything else that touches the site's records (its
ledger and cache, its data and teacher, how its records are read) is in the policy, so no
request can reach it (common/site_config.py).

Where the policy comes from, in this order (never from the run config):
1. the file named by the SuperNode's node config key `site-policy`;
2. the file named by the environment variable FEDISTILL_SITE_POLICY (`fedistill simulate`
   writes one for its virtual sites from its own command line and sets it on the processes
   it starts);
3. the built-in defaults in conf/site.yaml.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.config import CONF_DIR, ConfigError, HostileConfig, cache_path
from common.config_base import POLICY_ENV, check_device
from common.task_config import check_task_settings

if TYPE_CHECKING:
    from common.request import RunRequest

POLICY_FILE = CONF_DIR / "site.yaml"
POLICY_NODE_KEY = "site-policy"
SITE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class SuperNodeSettings:
    """How a deployed site's SuperNode reaches the coordinator (used by `fedistill site`, not by the app)."""

    superlink: str = "127.0.0.1:8000"      # the coordinator's SuperLink, host:port
    root_certificates: str | None = None   # the deployment's CA certificate (PEM)
    private_key: str | None = None         # this site's registered key (OpenSSH EC private key)
    insecure: bool = False                 # plain text, no node authentication: loopback trials only


@dataclass
class SitePolicy:
    name: str | None
    epsilon: float
    delta: float
    require_dp: bool
    max_rounds: int
    ledger_dir: str | None
    cache_dir: str | None
    data_path: str | None
    task_sources: list[str]
    teacher_path: str | None
    teacher_sha256: str | None
    public_sha256: str | None
    app_sha256: list[str]
    allow_unpinned_apps: bool
    metrics_port: int | None
    metrics_host: str
    reply_after_s: float
    size_class: int | None  # the record count the site declares publicly; the step plan is chosen for its class
    task: dict[str, Any] = field(default_factory=dict)  # the site's own task settings (TaskConfig keys)
    supernode: SuperNodeSettings = field(default_factory=SuperNodeSettings)
    hostile: HostileConfig = field(default_factory=HostileConfig)  # attack trials: client/hostile.py
    device: str = "auto"  # where this site's teacher pass and DP training run (common/device.py)

    def validate(self) -> None:
        checks = (
            (0 < self.epsilon < math.inf, f"site.epsilon must be a finite number > 0, got {self.epsilon}"),
            (0 < self.delta < 1, f"site.delta must be in (0, 1), got {self.delta}"),
            (self.max_rounds >= 1, f"site.max_rounds must be >= 1, got {self.max_rounds}"),
            (all(isinstance(s, str) and s for s in self.task_sources),
             f"site.task_sources must be a list of task sources, got {self.task_sources}"),
            (self.name is None or bool(SITE_NAME.fullmatch(self.name)),
             f"site.name must be letters, digits, '_' or '-' (it names the ledger's folder), got {self.name!r}"),
            (all(h is None or (isinstance(h, str) and SHA256.fullmatch(h))
                 for h in (self.teacher_sha256, self.public_sha256, *self.app_sha256)),
             "site.teacher_sha256, site.public_sha256 and site.app_sha256 hold 64-character hex SHA-256 digests "
             "(as `fedistill assets` and `fedistill app-hash` print them)"),
            (self.metrics_port is None or 0 <= self.metrics_port < 65536,
             f"site.metrics_port must be a TCP port (0-65535) or null, got {self.metrics_port}"),
            (self.size_class is None or self.size_class >= 1,
             f"site.size_class must be a number of records >= 1 or null, got {self.size_class}"),
            (0 <= self.reply_after_s <= 86400,
             f"site.reply_after_s must be in [0, 86400] seconds, got {self.reply_after_s}"),
            (not {"name", "source", "kind"} & set(self.task),
             "site.task holds the site's settings of a task (data, split, teacher, ...), not task.name, "
             "task.source or task.kind: the run's request names the task, site.task_sources lists the sources "
             "allowed, and the app's conf/task/ says which code runs it"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_device(self.device, where="site.device")
        check_task_settings(self.task, where="site.task")  # applied in common/site_config.py
        try:
            self.hostile.validate()
        except ConfigError as err:
            raise ConfigError(f"site.{err}") from None

    @property
    def ledger_root(self) -> Path:
        """The folder of the site's privacy ledgers (one sub-folder per site name)."""
        if self.ledger_dir is not None:
            return Path(self.ledger_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "fedistill" / "ledgers"

    @property
    def cache_path(self) -> Path:
        return cache_path(self.cache_dir)

    @property
    def pads_replies(self) -> bool:
        """Whether replies are held until `reply_after_s`: a site with records of its own, whose
        number is private. The built-in partition (simulation) is public data."""
        return self.data_path is not None and self.reply_after_s > 0

    def violations(self, request: RunRequest) -> list[str]:
        """Why `request` lies outside this policy; empty when the site may accept it.

        Each reason names the setting and says what the site allows, and repeats nothing of
        the request. None depends on the site's records, so the reasons may leave the site.
        """
        asked = request.privacy
        problems = []
        if not asked.enabled:
            if self.require_dp:
                problems.append("privacy.enabled is false: the site's policy requires DP (site.require_dp)")
        else:
            if asked.epsilon > self.epsilon:
                problems.append(f"privacy.epsilon exceeds the site's budget {self.epsilon:g} (site.epsilon)")
            if asked.delta > self.delta:
                problems.append(f"privacy.delta exceeds the site's delta {self.delta:g} (site.delta)")
        if request.rounds > self.max_rounds:
            problems.append(f"rounds exceeds the site's limit of {self.max_rounds} per run (site.max_rounds)")
        if request.source not in self.task_sources:
            problems.append("task.source is not one of the site's task sources (site.task_sources)")
        return problems

    def check_delta(self, records: int) -> None:
        """The site's delta must be below 1/N of its own records (a delta of 1/N allows releasing
        one record outright); ConfigError otherwise. Checked when the records load, never per request."""
        if records and self.delta >= 1 / records:
            raise ConfigError(f"site.delta {self.delta:g} is not below 1/N for the site's {records} records "
                              f"({1 / records:.3g}): set delta below that, e.g. {_below(1 / records):g}")


def _below(limit: float) -> float:
    """A round power of ten below `limit`."""
    return 10.0 ** math.floor(math.log10(limit) - 1)


def policy_from(values: Mapping | None = None, *, origin: str = "the site policy") -> SitePolicy:
    """conf/site.yaml's defaults with `values` on top, validated."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SitePolicy), OmegaConf.load(POLICY_FILE), values or {})
        policy = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        known = ", ".join(f.name for f in SitePolicy.__dataclass_fields__.values())
        raise ConfigError(f"{origin}: key {key!r} is not accepted ({str(err).splitlines()[0]}); "
                          f"the keys of a site policy are: {known}") from None
    assert isinstance(policy, SitePolicy)
    try:
        policy.validate()
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    return policy


def load_policy(path: Path | str) -> SitePolicy:
    """A site policy file (YAML): any keys of conf/site.yaml; the rest keep their defaults.

    The file is read every time; what it says is parsed and checked once per content (a
    simulation worker reads it for every site it plays, which parsing would dominate).
    """
    path = Path(path).expanduser()
    try:
        text = path.read_bytes()
        key = (str(path), hashlib.sha256(text).hexdigest())
        if key not in _POLICIES:
            values = OmegaConf.load(io.BytesIO(text))
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"site policy {path} cannot be read ({err}): give the path of a YAML file "
                          f"with keys of {POLICY_FILE.name}") from None
    if key not in _POLICIES:
        if not isinstance(values, Mapping) and values is not None and not OmegaConf.is_dict(values):
            raise ConfigError(f"site policy {path} must be a YAML mapping of keys to values")
        policy = policy_from(values, origin=f"site policy {path}")
        while len(_POLICIES) >= 8:
            del _POLICIES[next(iter(_POLICIES))]
        _POLICIES[key] = policy
    return copy.deepcopy(_POLICIES[key])


_POLICIES: dict[tuple[str, str], SitePolicy] = {}


def site_policy(node_config: Mapping) -> SitePolicy:
    """This site's policy: the node config's file, the environment's, or the built-in defaults."""
    path = node_config.get(POLICY_NODE_KEY) or os.environ.get(POLICY_ENV)
    return load_policy(str(path)) if path else policy_from()
