"""What every config block uses: where conf/ is, the variable naming a site's policy file, the
error a refused setting raises, and the checks that raise it with a message naming the key, the
value and what is allowed. Importing it loads nothing heavy (the simulation runner holds no torch)."""

from __future__ import annotations

import re
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
POLICY_ENV = "FEDISTILL_SITE_POLICY"  # the site policy file of processes started without a node config


class ConfigError(ValueError):
    """A configuration key or value that fedistill refuses, with what is allowed."""


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(name: str, *, where: str) -> None:
    """ConfigError naming `where` unless `name` is a device this setting takes (common/device.py resolves it)."""
    if not isinstance(name, str) or not DEVICE.fullmatch(name):
        raise ConfigError(f"{where} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def require_fraction(name: str, value: float, *, low_open: bool = True) -> None:
    low_ok = value > 0 if low_open else value >= 0
    require(low_ok and value <= 1, f"{name} must be in (0, 1], got {value}")
