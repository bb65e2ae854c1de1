"""A coordinator whose machine dies in the middle of a round, on a real loopback deployment
(SuperLink, two SuperNodes started by `fedistill site`, TLS): started again on its state, it
continues the run with `fedistill submit resume=<run_dir>` from the last complete round, and the
sites' ledgers go on, within their budgets."""

from __future__ import annotations

import json
import subprocess

import pytest

from common.privacy import Budget, PrivacyLedger
from fedistill.loopback import LoopbackDeployment, command_env
from fedistill.processes import stop
from tests.deploy.test_site_dies import wait_for
from tests.test_curious_coordinator import site_records

pytestmark = pytest.mark.e2e

EPSILON = 2.0
HOLD_S = 10  # each reply held this long (not the default 60 s), so the coordinator dies while round 2 is under way
RUN = ["task=digits", "rounds=3", "federation.min_sites=2", "federation.round_timeout=120", "distill.local_epochs=1",
       f"privacy.epsilon={EPSILON}"]


def saved_round(deployment: LoopbackDeployment) -> int:
    states = [run / "checkpoints" / "state.json" for run in deployment.runs()]
    try:
        return max((json.loads(s.read_text())["round"] for s in states if s.exists()), default=-1)
    except json.JSONDecodeError:
        return -1


def test_a_killed_coordinator_restarts_and_the_run_resumes_from_its_last_round(tmp_path, cache_dir):
    sites = {name: {"cache_dir": cache_dir, "task_sources": ["digits"], "data_path": str(site_records(tmp_path, name)),
                    "allow_unpinned_apps": True, "epsilon": EPSILON, "reply_after_s": HOLD_S}
             for name in ("site-a", "site-b")}
    with LoopbackDeployment(tmp_path / "deployment", sites) as deployment:
        submit = subprocess.Popen(deployment.submit_command(*RUN), env=command_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for(lambda: saved_round(deployment) >= 1, "round 1 was never saved")
            deployment.restart_coordinator()
        finally:
            stop(submit, timeout=10)
        [run] = deployment.runs()
        resumed = deployment.submit(f"resume={run}")
        ledgers = {name: PrivacyLedger.inspect(deployment.root / "ledgers" / name, budget=Budget(EPSILON, 1e-5))
                   for name in sites}
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and len(summary["flower_runs"]) == 2
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    for name, ledger in ledgers.items():
        assert len({e.run for e in ledger.entries}) == 2, name
        assert len(ledger.entries) >= 3  # every round it trained, and one the dead coordinator never received
        assert 0 < ledger.epsilon_spent() <= EPSILON
