"""Read the Hydra configuration into typed, validated objects (the only place that does)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.config_base import CONF_DIR, ConfigError, check_device, require, require_fraction
from common.task_config import TaskConfig, task_config_type

RUNS_ENV = "FEDISTILL_RUNS_DIR"  # where a ServerApp puts a run's folder when the run sets no run_dir
METRICS_ENV = "FEDISTILL_METRICS_ADDRESS"  # host:port of `fedistill coordinator --metrics-*`, for a run that sets none


# Upper bounds on noise settings: beyond them the accountant's analysis overflows or never
# returns, and noise that large teaches nothing.
MAX_NOISE_MULTIPLIER = 1000.0
MAX_COUNT_NOISE = 1e6


STUDENT_ARCHS = ("mlp", "transformer", "bag", "llama", "pruned")


@dataclass
class StudentConfig:
    arch: str                 # one of the task kind's students (TaskConfig.students)
    hidden: list[int] = field(default_factory=list)  # mlp: hidden widths
    dim: int = 128            # text: token embedding width (and the transformer's width)
    layers: int = 2           # transformer blocks (pruned: the teacher's layers kept)
    heads: int = 4            # (pruned: query heads kept per layer; 0: all)
    ff: int = 256             # hidden width of each block's MLP (transformer), of the MLP (bag)
    freeze_embeddings: bool = True  # text: token embeddings stay the teacher's, projected
    budget: float = 0.1       # pruned: non-embedding parameters, as a share of the teacher's

    def validate(self) -> None:
        require(self.arch in STUDENT_ARCHS, f"student.arch must be one of {', '.join(STUDENT_ARCHS)}, got {self.arch!r}")
        require(
            all(h > 0 for h in self.hidden),
            f"student.hidden must be a list of positive ints, got {self.hidden}",
        )
        for key in ("dim", "layers", "ff"):
            require(getattr(self, key) > 0, f"student.{key} must be > 0, got {getattr(self, key)}")
        if self.arch == "pruned":  # its width is the teacher's; heads are checked against the teacher's
            require(0 < self.budget <= 1, f"student.budget must be in (0, 1], got {self.budget}")
            require(self.heads >= 0, f"student.heads must be >= 0 (0: all of the teacher's), got {self.heads}")
            return
        require(self.heads > 0, f"student.heads must be > 0, got {self.heads}")
        require(self.dim % self.heads == 0, f"student.dim ({self.dim}) must be a multiple of student.heads ({self.heads})")


@dataclass
class DistillConfig:
    temperature: float
    alpha: float
    local_epochs: int | None  # None: chosen by the DP-aware rule (common/step_plan.py)
    sample_rate: float | None
    batch_size: int | None
    lr: float | None
    momentum: float
    feature_weight: float = 0.0    # student's projected pooled state toward the teacher's sentence embedding
    attention_weight: float = 0.0  # student's attention maps toward the teacher's (averaged over heads)
    attention_layers: list[list[int]] = field(default_factory=lambda: [[-1, -1]])  # [student, teacher] block pairs
    max_physical_batch: int = 0    # > 0: a step's Poisson batch is processed in chunks of this many records

    def validate(self) -> None:
        require(self.feature_weight >= 0, f"distill.feature_weight must be >= 0, got {self.feature_weight}")
        require(self.attention_weight >= 0, f"distill.attention_weight must be >= 0, got {self.attention_weight}")
        require(len(self.attention_layers) >= 1 and all(len(p) == 2 for p in self.attention_layers),
                 f"distill.attention_layers must be a non-empty list of [student block, teacher layer] pairs, "
                 f"got {self.attention_layers}")
        require(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")
        require(0 <= self.alpha <= 1, f"distill.alpha must be in [0, 1], got {self.alpha}")
        require(self.local_epochs is None or self.local_epochs >= 1,
                 f"distill.local_epochs must be >= 1 or null (the DP-aware rule), got {self.local_epochs}")
        if self.sample_rate is not None:
            require_fraction("distill.sample_rate", self.sample_rate)
        require(self.batch_size is None or self.batch_size >= 1,
                 f"distill.batch_size must be >= 1 or null (the DP-aware rule), got {self.batch_size}")
        require(self.lr is None or self.lr > 0, f"distill.lr must be > 0 or null (the DP-aware rule), got {self.lr}")
        require(0 <= self.momentum < 1, f"distill.momentum must be in [0, 1), got {self.momentum}")
        require(self.max_physical_batch >= 0,
                 f"distill.max_physical_batch must be >= 0 (0: the whole batch at once), got {self.max_physical_batch}")


@dataclass
class PrivacyConfig:
    enabled: bool
    epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str
    max_noise_multiplier: float

    def validate(self) -> None:
        require(
            0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}"
        )
        require(
            self.accountant == "rdp",
            f"privacy.accountant must be 'rdp' (the accountant used both to calibrate "
            f"noise and to check the budget), got {self.accountant!r}",
        )
        if self.enabled:
            require(
                0 < self.epsilon < math.inf,
                f"privacy.epsilon must be a finite number > 0 when privacy.enabled=true, "
                f"got {self.epsilon}; to train without DP say privacy=none",
            )
            require(
                self.max_grad_norm > 0,
                f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}",
            )
            require(
                0 < self.max_noise_multiplier <= MAX_NOISE_MULTIPLIER,
                f"privacy.max_noise_multiplier must be in (0, {MAX_NOISE_MULTIPLIER:g}], got {self.max_noise_multiplier}",
            )


@dataclass
class ServerDistillConfig:
    epochs: int
    lr: float
    temperature: float
    batch_size: int
    patience: int
    holdout: float
    warm_start: bool = False  # distill the global student on the public inputs before round 1
    distill_teacher: bool = False  # weights exchange: distill it toward the teacher again after each round
    transfer: int = 0  # free inputs made from the public ones (common/transfer.py) for both

    def validate(self) -> None:
        require(self.epochs >= 1, f"exchange.server.epochs must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"exchange.server.lr must be > 0, got {self.lr}")
        require(self.temperature > 0, f"exchange.server.temperature must be > 0, got {self.temperature}")
        require(self.batch_size >= 1, f"exchange.server.batch_size must be >= 1, got {self.batch_size}")
        require(self.patience >= 1, f"exchange.server.patience must be >= 1, got {self.patience}")
        require(0 < self.holdout < 1, f"exchange.server.holdout must be in (0, 1), got {self.holdout}")
        require(0 <= self.transfer <= 1_000_000, f"exchange.server.transfer must be in [0, 1000000] inputs, "
                                                  f"got {self.transfer}")


EXCHANGE_MODES = ("weights", "logits")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan")
SELECTING_AGGREGATIONS = ("krum", "multikrum", "bulyan")  # weights only: they pick whole students
# What a hostile simulated site sends instead of its honest reply (client/hostile.py), by exchange.
HOSTILE_KINDS = {"weights": ("scale", "sign_flip", "random", "constant", "backdoor"),
                 "logits": ("inverted", "uniform")}
BROADCASTS = ("weights", "logits")
COMPRESSIONS = ("float32", "float16", "topk")
WEIGHTINGS = ("uniform", "noisy_count")


@dataclass
class ExchangeConfig:
    mode: str
    aggregation: str
    weighting: str
    count_noise: float
    trim_fraction: float
    assumed_hostile: float
    clip_update_norm: float | None
    max_abs_value: float
    max_reply_mb: float
    broadcast: str
    compression: str
    topk: int
    teacher_weight: float
    choose_teacher_weight: bool
    site_students: list[dict[str, Any]]
    public_fit_epochs: int
    server: ServerDistillConfig

    def validate(self) -> None:
        for key, allowed in (("mode", EXCHANGE_MODES), ("aggregation", AGGREGATIONS), ("weighting", WEIGHTINGS),
                             ("broadcast", BROADCASTS), ("compression", COMPRESSIONS)):
            value = getattr(self, key)
            require(value in allowed, f"exchange.{key} must be one of {', '.join(allowed)}; got {value!r}")
        require(0 < self.count_noise <= MAX_COUNT_NOISE,
                 f"exchange.count_noise must be in (0, {MAX_COUNT_NOISE:g}] records, got {self.count_noise}")
        require(0 <= self.trim_fraction < 0.5, f"exchange.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        require(0 <= self.assumed_hostile < 0.5,
                 f"exchange.assumed_hostile must be a share of the replies in [0, 0.5), got {self.assumed_hostile}")
        require(self.clip_update_norm is None or self.clip_update_norm > 0,
                 f"exchange.clip_update_norm must be > 0 or null (no clipping), got {self.clip_update_norm}")
        if self.mode == "logits":
            require(self.aggregation not in SELECTING_AGGREGATIONS,
                     f"exchange.aggregation={self.aggregation} picks whole students, which the logits exchange does "
                     "not send: use mean, median or trimmed_mean with exchange=logits")
            require(self.clip_update_norm is None,
                     "exchange.clip_update_norm clips weight updates, which the logits exchange does not send: "
                     "leave it null with exchange=logits")
        require(self.max_abs_value > 0, f"exchange.max_abs_value must be > 0, got {self.max_abs_value}")
        require(self.max_reply_mb > 0, f"exchange.max_reply_mb must be > 0, got {self.max_reply_mb}")
        require(self.topk >= 1, f"exchange.topk must be >= 1, got {self.topk}")
        require(0 <= self.teacher_weight <= 1, f"exchange.teacher_weight must be in [0, 1], got {self.teacher_weight}")
        require(self.public_fit_epochs >= 0, f"exchange.public_fit_epochs must be >= 0, got {self.public_fit_epochs}")
        fields = set(StudentConfig.__dataclass_fields__) - {"arch"}
        for settings in self.site_students:
            unknown = sorted(set(settings) - fields)
            require(not unknown, f"exchange.site_students sets {unknown}, which are not student settings; "
                                  f"a site's student may change {', '.join(sorted(fields))}")
        if self.site_students:
            require(
                self.mode == "logits" and self.broadcast == "logits",
                "exchange.site_students (different students per site) needs exchange=logits and "
                "exchange.broadcast=logits: with weights on the wire every site must run the global student",
            )
        self.server.validate()

    def student_for(self, site: int, default: StudentConfig) -> StudentConfig:
        """The student site number `site` runs: the global one, or its own (cycled through the list)."""
        if not self.site_students:
            return default
        settings = self.site_students[site % len(self.site_students)]
        return dataclasses.replace(default, **{k: list(v) if isinstance(v, list) else v for k, v in settings.items()})


@dataclass
class HostileConfig:
    """Simulated sites that send a hostile reply instead of their honest one (client/hostile.py)."""

    kind: str = "none"    # none, or one of HOSTILE_KINDS[exchange.mode]
    fraction: float = 0.0  # share of the sites that are hostile (rounded, at least one when > 0)

    def validate(self, mode: str | None = None) -> None:
        kinds = HOSTILE_KINDS[mode] if mode else sum(HOSTILE_KINDS.values(), ())
        require(self.kind == "none" or self.kind in kinds,
                 f"hostile.kind must be none or one of {', '.join(kinds)}" + (f" with exchange={mode}" if mode else "")
                 + f", got {self.kind!r}")
        require(0 <= self.fraction <= 1, f"hostile.fraction must be in [0, 1], got {self.fraction}")

    def is_hostile(self, partition: int, partitions: int) -> bool:
        """Whether site number `partition` of `partitions` is hostile: the last round(fraction x
        partitions) of them (at least one when fraction > 0)."""
        if self.kind == "none" or self.fraction == 0:
            return False
        return partition >= partitions - max(1, round(self.fraction * partitions))


@dataclass
class FederationConfig:
    fraction_train: float
    min_sites: int
    min_replies: int
    max_failed_rounds: int
    round_timeout: float
    cpus_per_site: int
    metrics_port: int | None  # the ServerApp serves Prometheus metrics here during the run
    metrics_host: str
    hostile: HostileConfig = field(default_factory=HostileConfig)  # simulation only: the sites' policy says it

    def validate(self) -> None:
        require_fraction("federation.fraction_train", self.fraction_train)
        require(self.metrics_port is None or 0 < self.metrics_port < 65536,
                 f"federation.metrics_port must be a TCP port (1-65535) or null, got {self.metrics_port}")
        require(self.min_sites >= 1, f"federation.min_sites must be >= 1, got {self.min_sites}")
        require(self.min_replies >= 1, f"federation.min_replies must be >= 1, got {self.min_replies}")
        require(self.max_failed_rounds >= 0, f"federation.max_failed_rounds must be >= 0 (0: never stop), "
                                             f"got {self.max_failed_rounds}")
        require(self.round_timeout > 0, f"federation.round_timeout must be > 0, got {self.round_timeout}")
        require(self.cpus_per_site >= 1, f"federation.cpus_per_site must be >= 1, got {self.cpus_per_site}")


@dataclass
class Config:
    task: TaskConfig
    student: StudentConfig
    distill: DistillConfig
    privacy: PrivacyConfig
    exchange: ExchangeConfig
    federation: FederationConfig
    sites: int
    rounds: int
    seed: int
    run_dir: str | None
    cache_dir: str | None
    resume: str | None  # a run directory: continue that run from its last complete round (server.resume)
    device: str = "auto"  # where tensors run (common/device.py); a site's own file decides for that site
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(self.sites >= 1, f"sites must be >= 1, got {self.sites}")
        require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        check_device(self.device, where="device")
        require(
            self.federation.min_sites <= self.sites,
            f"federation.min_sites ({self.federation.min_sites}) must be <= sites ({self.sites})",
        )
        sampled = min(self.sites, max(int(self.sites * self.federation.fraction_train), self.federation.min_sites))
        require(
            self.federation.min_replies <= sampled,
            f"federation.min_replies ({self.federation.min_replies}) must be <= the {sampled} sites sampled each round "
            f"(sites={self.sites}, federation.fraction_train={self.federation.fraction_train:g}): every round would fail",
        )
        for part in (self.task, self.student, self.distill, self.privacy, self.exchange, self.federation):
            part.validate()
        try:
            self.federation.hostile.validate(self.exchange.mode)
        except ConfigError as err:
            raise ConfigError(f"federation.{err}") from None
        require(not (self.federation.hostile.kind == "backdoor" and self.task.kind == "lm"),
                 "federation.hostile.kind=backdoor stamps a trigger on a classifier's inputs; task=lm has no class "
                 "to teach it: choose scale, sign_flip, random or constant")
        self.task.validate_run(self)

    @property
    def cache_path(self) -> Path:
        return cache_path(self.cache_dir)


def cache_path(cache_dir: str | None) -> Path:
    """`cache_dir`, or the user's cache folder for fedistill (fitted teachers, parsed data)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedistill"


def load_config(overrides: list[str] | str = (), *, values: Any = None) -> Config:
    """Compose conf/ with Hydra overrides and return a validated `Config`.

    `overrides` is a list (`["sites=3", "privacy.epsilon=1"]`) or one shell-quoted string,
    the form in which overrides travel through Flower's run config. `values` (a mapping of
    config keys, e.g. a site file's own settings) is merged over the composed config.
    """
    if isinstance(overrides, str):
        try:
            overrides = shlex.split(overrides)
        except ValueError as err:
            raise ConfigError(f"the overrides {overrides!r} do not split into key=value words ({err})") from None
    overrides = list(overrides)
    _check_groups(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            raw = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from None
    return to_config(raw, overrides, values)


def _check_groups(overrides: list[str]) -> None:
    """A config group (task=, student=, ...) takes the name of one of its files in conf/: Hydra
    answers anything else (a number, a list) with a traceback."""
    for override in overrides:
        key, equals, value = override.partition("=")
        group = key.lstrip("+~").split("@")[0]
        if equals and (CONF_DIR / group).is_dir():
            names = sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml"))
            if value not in names:
                raise ConfigError(f"{override}: {group} takes one of {', '.join(names)}")


def _explain(err: Exception, overrides: list[str]) -> str:
    """Hydra's message, plus the keys that do exist where an unknown key was given."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    message = message.split(" Config search path")[0]
    unknown = re.match(r"Could not override '([\w.]+)'", message)
    if not unknown:
        return f"{message} (overrides: {' '.join(overrides)})"
    key = unknown.group(1)
    parent, _, _ = key.rpartition(".")
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]  # e.g. task=text picks the student
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        defaults = compose(config_name="config", overrides=others)
    node = OmegaConf.select(defaults, parent) if parent else defaults
    known = sorted(node.keys()) if isinstance(node, DictConfig) else []
    return f"{key} is not a config key; the keys{' of ' + parent if parent else ''} are: {', '.join(known)}"


def to_config(raw: DictConfig, overrides: list[str], values: Any = None) -> Config:
    schema = OmegaConf.structured(Config)
    schema.task = OmegaConf.structured(task_config_type(OmegaConf.select(raw, "task.kind")))
    try:
        merged = OmegaConf.merge(schema, raw, values or {}, {"overrides": overrides})
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(
            f"config key {key!r} is not accepted: {str(err).splitlines()[0]}"
        ) from None
    assert isinstance(config, Config)
    # torch is imported here, not with this module: commands that only read files (status, certs,
    # register) import the config types without it
    from common.device import has_accelerator

    config.task = config.task.for_device(has_accelerator(config.device))
    config.validate()
    return config
