"""Shared fixtures: a small, fast configuration composed from the real conf/."""

from __future__ import annotations

import pytest

from common.config import Config, load_config


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One cache for the session, so the digits teacher is fitted once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def small_config(tmp_path, cache_dir) -> Config:
    return load_config(["task=digits", "sites=3", "rounds=2", f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"])
