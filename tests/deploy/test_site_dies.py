"""A site whose machine dies in the middle of a round, on a real loopback deployment (SuperLink,
two SuperNodes started by `fedistill site`, TLS): the round is combined from the site left, the
dead one is recorded as failed, counted by reason, and the run completes; the dead site's ledger
holds the round it reserved and never replied to (over-counted, never under-counted)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from common.privacy import LEDGER_FILE
from fedistill.loopback import LoopbackDeployment, command_env
from fedistill.processes import stop
from tests.test_curious_coordinator import site_records

pytestmark = pytest.mark.e2e

HOLD_S = 20  # both sites hold each reply this long, so a site is killed while its round is under way
RUN = ["task=digits", "rounds=2", "federation.min_sites=2", "federation.round_timeout=90", "distill.local_epochs=1"]


def wait_for(predicate, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def test_a_site_killed_mid_round_fails_that_round_and_the_run_goes_on(tmp_path, cache_dir):
    sites = {name: {"cache_dir": cache_dir, "task_sources": ["digits"], "data_path": str(site_records(tmp_path, name)),
                    "allow_unpinned_apps": True, "reply_after_s": HOLD_S} for name in ("site-a", "site-b")}
    with LoopbackDeployment(tmp_path / "deployment", sites) as deployment:
        submit = subprocess.Popen(deployment.submit_command(*RUN), env=command_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            ledger = deployment.root / "ledgers" / "site-b" / LEDGER_FILE
            wait_for(lambda: reserved_rounds(ledger) == [1], "site-b never reserved round 1")
            deployment.sites["site-b"].kill()  # between its reservation and its reply
            output, _ = submit.communicate(timeout=900)
        finally:
            stop(submit, timeout=10)
        [run] = deployment.runs()
    assert submit.returncode == 0, output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["failed_rounds"] == {}
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["sites_trained"], first["sites_failed"]) == (1, 1), first["problems"]
    assert [p["status"] for p in first["problems"]] == ["failed"]
    assert summary["dropped_replies"] and all(reason.startswith("failed: ") for reason in summary["dropped_replies"])
    assert sum(summary["dropped_replies"].values()) in (1, 2)  # round 2 may still have sampled it
    assert reserved_rounds(ledger) == [1]  # spent, though nothing left the site


def reserved_rounds(ledger) -> list[int]:
    try:
        return [entry["round"] for entry in json.loads(ledger.read_text())["entries"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or being written
        return []
