"""The run request: what a coordinator may ask of a site, as typed, bounded data in a versioned schema.

The coordinator composes its configuration with Hydra on its own side; what reaches a site
is this request, in every round's message. A site reads it as data: strict JSON of at most
`MAX_BYTES`, exactly the keys of the schema, each of its type and within its bounds, every
string one of the names its key allows. Nothing in it is composed, evaluated, interpolated,
imported or joined into a path, and nothing in it is repeated back: a request outside the
schema is refused with one fixed reason (`RequestError.REASON`), and the key at fault goes
to the site's own log only.

Which task a site runs is named here; every setting of that task (data, paths, columns,
labels, lengths, splits, teacher) is the site's own (common/site_config.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from common.config import Config, ConfigError, DistillConfig, ExchangeConfig, PrivacyConfig, StudentConfig
from common.task_config import TASK_NAME

VERSION = 4  # 2: exchange.choose_teacher_weight; 3: exchange.assumed_hostile, exchange.clip_update_norm;
             # 4: student.budget (student=pruned)
MAX_BYTES = 64 * 1024
MAX_ITEMS = 64  # the longest list any key may hold
MAX_STRING = 64
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
SOURCE = re.compile(rf"[A-Za-z0-9_-]{{1,64}}|{_IDENTIFIER}(\.{_IDENTIFIER}){{0,15}}:{_IDENTIFIER}")

# Inclusive bounds of every number (list items included); each section's validate() then
# applies its own rules (open ends, sums, relations between keys).
BIG = 2**20
BOUNDS: dict[str, tuple[float, float]] = {
    "rounds": (1, 100_000), "seed": (0, 2**32 - 1),
    "student.hidden": (1, BIG), "student.dim": (1, BIG), "student.layers": (1, 256), "student.heads": (0, 1024),
    "student.ff": (1, BIG), "student.budget": (1e-6, 1.0),
    "distill.temperature": (0, 1000), "distill.alpha": (0, 1), "distill.local_epochs": (1, 1000),
    "distill.sample_rate": (1e-6, 1), "distill.batch_size": (1, BIG), "distill.lr": (0, 1e6),
    "distill.momentum": (0, 1), "distill.feature_weight": (0, 1e6), "distill.attention_weight": (0, 1e6),
    "distill.attention_layers": (-256, 256), "distill.max_physical_batch": (0, BIG),
    "privacy.epsilon": (0, math.inf), "privacy.delta": (0, 1), "privacy.max_grad_norm": (0, 1e6),
    "privacy.max_noise_multiplier": (0, 1000),
    "exchange.count_noise": (0, 1e6), "exchange.trim_fraction": (0, 0.5),
    "exchange.assumed_hostile": (0, 0.5), "exchange.clip_update_norm": (0, 1e30), "exchange.max_abs_value": (0, 1e30),
    "exchange.max_reply_mb": (0, 1e6), "exchange.topk": (1, BIG), "exchange.teacher_weight": (0, 1),
    "exchange.public_fit_epochs": (0, 10_000),
    "exchange.server.epochs": (1, 100_000), "exchange.server.lr": (0, 1e6), "exchange.server.temperature": (0, 1000),
    "exchange.server.batch_size": (1, BIG), "exchange.server.patience": (1, 100_000),
    "exchange.server.holdout": (0, 1), "exchange.server.transfer": (0, 1_000_000),
}


class RequestError(ValueError):
    """A request outside the schema. `REASON` may leave the site; `detail` (which key, why) stays in its log."""

    REASON = f"the request does not follow the run-request schema (version {VERSION}); the site's own log names the key"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class RunRequest:
    """What a coordinator asks of a site for one run."""

    task: str     # a task of the site's conf/task/ (the site composes it with its own settings)
    source: str   # the task's loader: a built-in name or package.module:factory, which the site must list
    student: StudentConfig
    distill: DistillConfig
    privacy: PrivacyConfig
    exchange: ExchangeConfig
    rounds: int
    seed: int     # model initialisation and training order; never how a site reads its records


def request_of(config: Config) -> RunRequest:
    """The request the coordinator's composed `config` sends to every site."""
    return RunRequest(task=config.task.name, source=config.task.source, student=config.student,
                      distill=config.distill, privacy=config.privacy, exchange=config.exchange,
                      rounds=config.rounds, seed=config.seed)


def encode(request: RunRequest) -> str:
    """The request as the JSON text that travels (`Infinity` is the only non-finite number it may hold)."""
    return json.dumps({"version": VERSION, **dataclasses.asdict(request)}, sort_keys=True, separators=(",", ":"))


def decode(text: object) -> RunRequest:
    """The request in `text`, checked against the schema; RequestError otherwise."""
    if not isinstance(text, str):
        raise RequestError(f"the request is a {type(text).__name__}, not JSON text")
    if len(text.encode()) > MAX_BYTES:
        raise RequestError(f"the request is longer than {MAX_BYTES} bytes")
    try:
        document = json.loads(text, parse_constant=_constant)
    except (ValueError, RecursionError) as err:
        raise RequestError(f"the request is not JSON: {err}") from None
    if not isinstance(document, dict) or type(document.get("version")) is not int or document["version"] != VERSION:
        raise RequestError(f"the request is not a version-{VERSION} run request")
    document.pop("version")
    request = _convert(document, RunRequest, "")
    if not TASK_NAME.fullmatch(request.task):
        raise RequestError("task is not a task name ([A-Za-z0-9_-], at most 64 characters)")
    if not SOURCE.fullmatch(request.source):
        raise RequestError("source is neither a task name nor package.module:factory")
    for section in (request.student, request.distill, request.privacy, request.exchange):
        try:
            section.validate()
        except ConfigError as err:
            raise RequestError(str(err)) from None
    return request


def _constant(name: str) -> float:
    if name != "Infinity":
        raise ValueError(f"{name} is not a number a request may hold")
    return math.inf


def _convert(value: Any, kind: Any, key: str) -> Any:
    """`value` (parsed JSON) as `kind`, exactly: a dataclass from an object with all of its fields
    and no others, lists of bounded length, numbers within BOUNDS, short strings (which the
    sections' validate() then holds to their names)."""
    if dataclasses.is_dataclass(kind):
        return _dataclass(value, kind, key)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is types.UnionType and type(None) in args:  # X | None: null, or an X
        return None if value is None else _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            raise RequestError(f"{key} must be a list of at most {MAX_ITEMS} items")
        return [_convert(item, args[0], key) for item in value]
    if kind is bool:
        if not isinstance(value, bool):
            raise RequestError(f"{key} must be true or false")
        return value
    if kind is int:
        if type(value) is not int:
            raise RequestError(f"{key} must be a whole number")
        return _bounded(value, key)
    if kind is float:
        if type(value) not in (int, float) or math.isnan(value):
            raise RequestError(f"{key} must be a number")
        return _bounded(float(value), key)
    if kind is str:  # each section's validate() then holds it to its names
        if not isinstance(value, str) or len(value) > MAX_STRING:
            raise RequestError(f"{key} must be a name of at most {MAX_STRING} characters")
        return value
    if origin is dict and key == "exchange.site_students":
        return _site_student(value, key)
    raise RequestError(f"{key} has no type a request may hold")


def _dataclass(value: Any, kind: type, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    if not isinstance(value, dict) or set(value) != set(fields):
        raise RequestError(f"{key or 'the request'} must be an object with exactly the keys {sorted(fields)}")
    hints = typing.get_type_hints(kind)
    return kind(**{name: _convert(value[name], hints[name], f"{key}.{name}".lstrip(".")) for name in fields})


def _site_student(value: Any, key: str) -> dict[str, Any]:
    """One entry of exchange.site_students: some student settings (not the architecture)."""
    hints = typing.get_type_hints(StudentConfig)
    allowed = set(hints) - {"arch"}
    if not isinstance(value, dict) or not set(value) <= allowed:
        raise RequestError(f"{key} entries may set only {sorted(allowed)}")
    return {name: _convert(item, hints[name], f"student.{name}") for name, item in value.items()}


def _bounded(value: float, key: str) -> float:
    low, high = BOUNDS.get(key, (-BIG, BIG))
    if not low <= value <= high:
        raise RequestError(f"{key} must be in [{low:g}, {high:g}]")
    return value


def schema_keys() -> dict[str, Any]:
    """Every leaf key of the schema and its type (for the documentation and tests)."""
    def walk(kind: type, prefix: str) -> dict[str, Any]:
        keys = {}
        for name, hint in typing.get_type_hints(kind).items():
            key = f"{prefix}{name}"
            if typing.get_origin(hint) is types.UnionType:  # X | None: an X
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            keys |= walk(hint, f"{key}.") if dataclasses.is_dataclass(hint) else {key: hint}
        return keys
    return walk(RunRequest, "")
