"""Real Flower runs where the point is the wire: the run config is a request, the site's policy rules.

Each SuperLink here gets its virtual sites' policy through its environment, as `fedistill
simulate` gives it, and runs are submitted to it with whatever run config a coordinator
chooses, including ones the sites must refuse.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.policy import POLICY_ENV
from fedistill.cli import APP_DIR, resolve_paths, write_run_config
from fedistill.processes import processes_using
from fedistill.simulation import SimulationSuperLink

pytestmark = pytest.mark.e2e  # real Flower simulations


@contextmanager
def sites_with_policy(root: Path, policy: Path):
    """A simulation SuperLink whose virtual sites all follow `policy`; stopped afterwards."""
    link_dir = root / "link"
    link_dir.mkdir(parents=True)
    try:
        with SimulationSuperLink(link_dir, env={POLICY_ENV: str(policy)}) as link:
            yield link
    finally:
        leftovers = processes_using(link_dir)
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"processes left running: {leftovers}"


def submit(link: SimulationSuperLink, run_dir: Path, cache_dir: str, *overrides: str, sites: int = 2) -> dict:
    """Submit one run (`flwr run` with this run config) and return its summary."""
    overrides, _ = resolve_paths(["task=digits", f"sites={sites}", "rounds=1", f"cache_dir={cache_dir}",
                                  f"run_dir={run_dir}", *overrides])
    run_dir.mkdir(parents=True)
    # federation.cpus_per_site's default: on two cores one Ray actor plays every site, loading the ClientApp once
    code = link.run(APP_DIR, write_run_config(run_dir, overrides), num_supernodes=sites, cpus_per_site=2,
                    echo=lambda line: None)
    log = link.workdir / "flower.log"
    assert code == 0 and (run_dir / "summary.json").exists(), log.read_text()[-4000:]  # flwr exits 0 on a failed run
    return json.loads((run_dir / "summary.json").read_text())


def refusals(summary: dict) -> list[dict]:
    return [r for s in summary["privacy"]["sites"] for r in s["refusals"]]


def test_a_round_without_dp_is_recorded_and_later_dp_claims_are_refused(tmp_path, cache_dir):
    policy = tmp_path / "site.yaml"
    policy.write_text(f"require_dp: false\ntask_sources: [digits]\nledger_dir: {tmp_path / 'ledgers'}\n"
                      f"cache_dir: {cache_dir}\n")
    with sites_with_policy(tmp_path, policy) as link:
        baseline = submit(link, tmp_path / "no-dp", cache_dir, "privacy=none")
        assert baseline["rounds_completed"] == 1
        assert all(s["epsilon"] is None for s in baseline["privacy"]["sites"])  # infinite, written as null
        ledger = json.loads((tmp_path / "ledgers" / "site-0" / "ledger.json").read_text())
        assert [e["dp"] for e in ledger["entries"]] == [False]
        later = submit(link, tmp_path / "dp", cache_dir)
    assert later["rounds_completed"] == 0
    assert {r["code"] for r in refusals(later)} == {"budget"}
    assert "released without DP" in (tmp_path / "link" / "flower.log").read_text()  # the sites' own log says why
