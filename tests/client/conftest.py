"""A site as the ClientApp builds it, without Flower's processes: the coordinator's composed config
becomes a request, the site composes its own configuration from it and its policy."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from client.site import Site, clear_sites, load_site
from common import payload as P
from common.config import load_config
from common.policy import SitePolicy, policy_from
from common.request import encode, request_of
from common.site_config import site_config
from server.rounds import for_site


@pytest.fixture
def policy(tmp_path, cache_dir) -> SitePolicy:
    return policy_from({"ledger_dir": str(tmp_path / "ledgers"), "cache_dir": cache_dir})


def _make_site(overrides: list[str], policy: SitePolicy, partition: int = 0, sites: int = 3) -> Site:
    return load_site(site_config(policy, request_of(load_config(overrides))), policy, partition, sites)


@pytest.fixture
def make_site():
    """make_site(overrides, policy, partition=0, sites=3): the site that plays `partition` of `sites`
    for the run the coordinator composes from `overrides`."""
    clear_sites()
    return _make_site


@pytest.fixture
def site(small_config, policy, make_site) -> Site:
    return make_site(small_config.overrides, policy)


def _round_content(site: Site, rounds_left: int | None = None, server_round: int = 1, **asset_changes) -> RecordDict:
    torch.manual_seed(0)
    request = encode(request_of(site.config))
    content = RecordDict({P.ARRAYS: P.model_to_record(site.task.student(site.config.student)),
                          P.CONFIG: ConfigRecord({**site.assets, **asset_changes, P.SERVER_ROUND: server_round,
                                                  P.REQUEST: request})})
    return content if rounds_left is None else for_site(content, rounds_left)


@pytest.fixture
def round_content():
    """round_content(site, rounds_left=None, server_round=1, **asset changes): a round's message as the
    server sends it: the global student, the request and the announced assets."""
    return _round_content
