"""A simulation worker killed in the middle of a round, on real Flower processes (SuperLink,
simulation engine, Ray): the round fails by that reason, counted, never listed site by site;
the run stops as configured, says how to go on, and `resume=` runs the rounds left."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from common.privacy import LEDGER_FILE
from fedistill.processes import processes_using

pytestmark = pytest.mark.e2e

FEDISTILL = [sys.executable, "-m", "fedistill.cli", "simulate"]
# A site's round is ~2,000 DP-SGD steps (seconds, where the default takes milliseconds), so the
# worker is killed while it trains round 1 (simulated sites never hold their replies: their
# partition is public); one failed round stops the run.
RUN = ["task=digits", "sites=2", "rounds=3", "distill.sample_rate=0.01", "distill.local_epochs=20", "federation.max_failed_rounds=1"]


def reserved(run_dir) -> bool:
    for ledger in run_dir.glob(f"ledger/site-*/{LEDGER_FILE}"):
        try:
            if json.loads(ledger.read_text())["entries"]:
                return True
        except (json.JSONDecodeError, KeyError):  # being written
            pass
    return False


def test_a_worker_killed_mid_round_fails_the_round_by_reason_and_resume_runs_the_rest(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*FEDISTILL, f"run_dir={run_dir}", *RUN, f"cache_dir={cache_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not reserved(run_dir):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        workers = [p for p in processes_using(run_dir) if "ClientAppActor" in " ".join(p.cmdline())]
        assert workers, "a Ray worker should be running the site's round"
        for worker in workers:
            worker.kill()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        for left in processes_using(run_dir):
            left.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert proc.returncode == (0 if summary["rounds_completed"] else 1), out + err
    assert f"resume={run_dir}" in err  # the run stopped, and says how to go on
    # The worker's site failed, and every later message to the dead worker: one reason, counted.
    [(reason, count)] = summary["dropped_replies"].items()
    assert "ActorDiedError" in reason and "\n" not in reason and count >= 2
    assert any(r.startswith("0 valid replies") for r in summary["failed_rounds"])
    assert any(r.startswith("not run") for r in summary["failed_rounds"])
    ran = [r["round"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if not (r["round_failed"] or "").startswith("not run")]

    resumed = subprocess.run([*FEDISTILL, f"resume={run_dir}"], capture_output=True, text=True, timeout=900)
    left = processes_using(run_dir)
    for p in left:
        p.kill()
    assert not left
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["sites_trained"] == 2 for r in rounds[len(ran):])  # the rounds left, with new workers
    charged, trained, runs = 0, 0, set()
    for site in summary["privacy"]["sites"]:
        entries = json.loads((run_dir / "ledger" / site["site"] / LEDGER_FILE).read_text())["entries"]
        runs |= {e["run"] for e in entries}
        charged, trained = charged + len(entries), trained + site["rounds_trained"]
        assert 0 < site["epsilon"] <= site["budget"]
    assert len(runs) == 2  # the ledgers go on across the resume
    assert charged > trained  # the reply the worker never sent stays charged: over-counted, never under
