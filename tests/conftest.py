"""Shared fixtures: a small, fast configuration composed from the real conf/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import Config, load_config


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One cache for the session, so the digits teacher is fitted once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def small_config(tmp_path, cache_dir) -> Config:
    return load_config(["task=digits", "sites=3", "rounds=2", f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}"])


@pytest.fixture(scope="session", autouse=True)
def private_data_home(tmp_path_factory):
    """Sites without a policy file keep ledgers under $XDG_DATA_HOME: never the user's own, in tests.

    Set in the environment, so the Flower processes the tests start inherit it.
    """
    saved = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if saved is None:
        del os.environ["XDG_DATA_HOME"]
    else:
        os.environ["XDG_DATA_HOME"] = saved


@pytest.fixture
def write_policy(cache_dir):
    """write_policy(path, **values): a site policy file with `values`, the session's cache, and
    conf/site.yaml's defaults for the rest."""

    def write(path: Path, **values) -> Path:
        path.write_text(OmegaConf.to_yaml(OmegaConf.create({"cache_dir": cache_dir, **values})))
        return path

    return write
