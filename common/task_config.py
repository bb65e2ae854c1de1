"""What a task kind declares about itself: `TaskConfig`, the base of each kind's settings class
(the `CONFIG` of its module in common/tasks/, named by `kind` in its conf/task/*.yaml), its
frontier rows and targets, and finding a kind's class (only from the app's own conf/)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.config_base import CONF_DIR, ConfigError, require, require_fraction

if TYPE_CHECKING:
    from common.config import Config


@dataclass
class SplitConfig:
    teacher: float = 0.2
    public: float = 0.01
    test: float = 0.2

    def validate(self) -> None:
        for name in ("teacher", "public", "test"):
            require_fraction(f"task.split.{name}", getattr(self, name))
        private = 1.0 - self.teacher - self.public - self.test
        require(
            private >= 0.1,
            "task.split fractions teacher + public + test must leave at least 0.1 "
            f"for the sites' private part, got {self.teacher} + {self.public} + {self.test}",
        )


TASK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TASK_KIND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
TASKS_PACKAGE = "common.tasks"


@dataclass(frozen=True)
class FrontierSetting:
    """A frontier (`fedistill frontier`) that `make bench-privacy` measures for a task kind: the
    federation at `epsilons`, the public-only student and the federation without DP."""

    name: str
    overrides: tuple[str, ...]  # "{data}" stands for the benchmarks' data folder (../shared/data)
    epsilons: tuple[float, ...]
    needs: str | None = None    # a path under {data} the setting reads: skipped, and said so, without it
    heavy: bool = False         # hours on a CPU: measured only when asked for (--heavy)


@dataclass(frozen=True)
class FrontierTarget:
    """An issue's target on the frontiers: the figure at `value` must beat share * (the figure at
    `bar`) + offset. A place is (setting, what): what is an epsilon, "public_only", "no_dp" or
    "teacher"."""

    label: str
    value: tuple[str, float | str]
    bar: tuple[str, float | str]
    share: float = 1.0
    offset: float = 0.0
    lower_is_better: bool = False  # perplexity


@dataclass
class TaskConfig:
    """What every task has. A task kind (a module of common/tasks/, named by `kind` in its
    conf/task/*.yaml) subclasses this with its own settings as its module's `CONFIG`, says which
    students it trains, checks them, and builds its `Task`."""

    name: str
    source: str
    kind: str
    split: SplitConfig = field(default_factory=SplitConfig)  # tasks that cut one data set four ways
    dirichlet_alpha: float = 1.0
    # Simulation: how many sites hold each record of the built-in private part. 1: every record
    # at one site. k > 1 lets a small bundled set reach many sites (each site's DP holds for its
    # own ledger; across the federation a record held by k sites composes their k releases).
    sites_per_record: int = 1

    students: ClassVar[tuple[str, ...]] = ()  # the student.arch values this kind trains
    frontiers: ClassVar[tuple[FrontierSetting, ...]] = ()  # its rows of `make bench-privacy`
    frontier_targets: ClassVar[tuple[FrontierTarget, ...]] = ()

    def validate(self) -> None:
        require(bool(TASK_NAME.fullmatch(self.name)),
                 f"task.name must be letters, digits, '_' or '-' (it names cache files and folders), got {self.name!r}")
        self.split.validate()
        require(
            self.dirichlet_alpha > 0,
            f"task.dirichlet_alpha must be > 0 (smaller means more label skew), got {self.dirichlet_alpha}",
        )
        require(type(self.sites_per_record) is int and self.sites_per_record >= 1,
                f"task.sites_per_record must be an integer >= 1 (how many simulated sites hold each record), "
                f"got {self.sites_per_record!r}")

    def validate_run(self, config: Config) -> None:
        """Checks of the rest of a run against this task: by default, one of its students and no
        distillation term it has no outputs for."""
        arch, distill = config.student.arch, config.distill
        require(arch in self.students, f"task={self.name} trains {' or '.join(self.students)} students: "
                                        f"student={self.students[0]}, got student.arch={arch!r}")
        require(distill.feature_weight == 0 and distill.attention_weight == 0,
                 f"distill.feature_weight and distill.attention_weight need pooled features and attention maps, "
                 f"which task={self.name}'s students do not have (task=text's do)")

    def for_device(self, accelerator: bool) -> TaskConfig:
        """These settings with the defaults that depend on the run's device class filled in (the
        coordinator's: the request carries them filled); by default there are none."""
        return self

    def site_settings(self) -> dict[str, Any]:
        """These settings as a site file's `task:` block holds them: every key but name, source and
        kind, with the paths in them made absolute."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "source", "kind")}

    def build(self, config: Config) -> Any:
        """This kind's `Task` (common.tasks.Task) for `config`."""
        raise NotImplementedError(f"task kind {self.kind!r} declares no build()")


def task_config_type(kind: Any) -> type[TaskConfig]:
    """The settings class of task kind `kind`: the `CONFIG` of common/tasks/<kind>.py, or of the
    module `kind` names with dots. Only a site's own conf/ names a kind, never a request."""
    require(isinstance(kind, str) and bool(TASK_KIND.fullmatch(kind)),
             f"task.kind must name a module of common/tasks/ (image, text, lm, ...) or a dotted module path, got {kind!r}")
    module_name = kind if "." in kind else f"{TASKS_PACKAGE}.{kind}"
    try:
        config_type = importlib.import_module(module_name).CONFIG
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"task.kind {kind!r}: {module_name} is not a task module with a CONFIG ({err})") from None
    require(isinstance(config_type, type) and issubclass(config_type, TaskConfig),
             f"task.kind {kind!r}: {module_name}.CONFIG must be a subclass of common.task_config.TaskConfig")
    return config_type


@functools.cache
def task_kind_names() -> tuple[str, ...]:
    """The task kinds this app's conf/task/*.yaml use, in file order, without importing them:
    read once per process (conf/ is the app's code)."""
    kinds = []
    for path in sorted((CONF_DIR / "task").glob("*.yaml")):
        raw = OmegaConf.load(path)
        kind = OmegaConf.select(raw, "task.kind") or OmegaConf.select(raw, "kind")  # `@package _global_` or not
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


def task_kinds() -> dict[str, type[TaskConfig]]:
    """The settings class of every task kind this app's conf/task/*.yaml use, by kind."""
    return {kind: task_config_type(kind) for kind in task_kind_names()}


def check_task_settings(settings: Any, *, where: str) -> None:
    """ConfigError unless `settings` (a site file's `task:` block) are settings of one of the
    app's task kinds, naming the key that fits none. Kinds are imported one at a time, up to the
    first that fits: a site of the image task never imports the language models' stack."""
    if not (isinstance(settings, Mapping) or OmegaConf.is_dict(settings)):
        raise ConfigError(f"{where} must be a mapping of task settings (keys of conf/task/*.yaml), got {settings!r}")
    problems = []
    for kind in task_kind_names():
        try:
            OmegaConf.merge(OmegaConf.structured(task_config_type(kind)), settings)
            return
        except (OmegaConfBaseException, ValueError) as err:
            problems.append(f"{kind}: key {getattr(err, 'full_key', None)!r} is not a task setting "
                            f"({str(err).splitlines()[0]})")
    raise ConfigError(f"{where} fits no task of this app ({'; '.join(problems)}); see conf/task/*.yaml for the keys")


def absolute_path(path: str | None) -> str | None:
    """`path` made absolute from this directory (a site keeps the paths a command line gave it)."""
    return None if path is None else str(Path(os.path.expanduser(path)).absolute())
