"""A coordinator killed in the middle of a round, and `fedistill simulate resume=<run_dir>`, on
real Flower processes: the run goes on from its last complete round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from common.privacy import Budget, PrivacyLedger
from fedistill.processes import processes_using
from server.resume import Progress

pytestmark = pytest.mark.e2e  # real Flower simulations

FEDISTILL = [sys.executable, "-m", "fedistill.cli", "simulate"]
TOLERANCE = 1e-6  # largest weight difference allowed between a resumed and an uninterrupted run without DP


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDISTILL, *args], capture_output=True, text=True, timeout=900)


def crash_after_round(run_dir: Path, server_round: int, *overrides: str) -> None:
    """Start a run and kill it (the command, its SuperLink, the ServerApp and every site) with
    SIGKILL as soon as `server_round` is saved, while the next round is under way."""
    log = open(run_dir.parent / f"{run_dir.name}.out", "w")
    proc = subprocess.Popen([*FEDISTILL, f"run_dir={run_dir}", *overrides], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    state = run_dir / "checkpoints" / "state.json"
    try:
        while not (state.exists() and json.loads(state.read_text())["round"] >= server_round):
            assert proc.poll() is None, (run_dir.parent / f"{run_dir.name}.out").read_text()
            time.sleep(0.2)
    finally:
        for pid in [proc.pid, *(p.pid for p in processes_using(run_dir))]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        log.close()
    assert not (run_dir / "summary.json").exists()


def resume(run_dir: Path) -> dict:
    result = simulate(f"resume={run_dir}")
    leftovers = processes_using(run_dir)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"processes left running after fedistill exited: {leftovers}"
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming the run in {run_dir} after round 1 of 3" in result.stdout
    return json.loads((run_dir / "summary.json").read_text())


def rounds_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class TestWithoutDP:
    OVERRIDES = ("task=digits", "sites=2", "rounds=3", "privacy.enabled=false", "site.require_dp=false")

    def test_a_resumed_seeded_run_ends_with_the_uninterrupted_runs_student(self, tmp_path, cache_dir):
        whole, resumed = tmp_path / "whole", tmp_path / "resumed"
        done = simulate(f"run_dir={whole}", *self.OVERRIDES, f"cache_dir={cache_dir}")
        assert done.returncode == 0, done.stdout + done.stderr
        crash_after_round(resumed, 1, *self.OVERRIDES, f"cache_dir={cache_dir}")
        summary = resume(resumed)
        assert summary["rounds_completed"] == 3 and len(summary["flower_runs"]) == 2
        assert rounds_logged(resumed) == [1, 2, 3]  # a round logged after the saved one is not kept twice
        a, b = load_file(whole / "student.safetensors"), load_file(resumed / "student.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOLERANCE
        # and the student did move in the rounds after the resume, so the comparison means something
        saved = load_file(resumed / "checkpoints" / "round-001.safetensors")
        assert max((a[k] - saved[k]).abs().max().item() for k in a) > 1e-3


class TestWithDP:
    OVERRIDES = ("task=digits", "sites=2", "rounds=3", "privacy.epsilon=2")

    def test_a_resumed_run_continues_the_sites_ledgers_within_their_budgets(self, tmp_path, cache_dir):
        run_dir = tmp_path / "run"
        crash_after_round(run_dir, 1, *self.OVERRIDES, f"cache_dir={cache_dir}")
        before = {site.name: len(PrivacyLedger.inspect(site, budget=Budget(2.0, 1e-5)).entries)
                  for site in (run_dir / "ledger").iterdir() if site.is_dir()}
        summary = resume(run_dir)
        assert summary["rounds_completed"] == 3
        for site in summary["privacy"]["sites"]:
            ledger = PrivacyLedger.inspect(run_dir / "ledger" / site["site"], budget=Budget(2.0, 1e-5))
            runs = {e.run for e in ledger.entries}
            assert len(runs) == 2, runs  # the first part's releases are still there, and the second part's
            # A release the dead coordinator never received is still charged: never fewer entries
            # than the rounds the run says the site trained.
            assert len(ledger.entries) >= site["rounds_trained"] == 3
            assert len(ledger.entries) > before[site["site"]]
            assert 0 < ledger.epsilon_spent() <= 2.0
            assert len(site["epsilon_earlier_parts"]) == 1 and site["epsilon_earlier_parts"][0] > 0
        assert "This run was resumed" in (run_dir / "privacy.md").read_text()


def test_resume_refuses_another_setting_a_finished_run_and_a_folder_without_a_saved_round(tmp_path):
    missing = simulate(f"resume={tmp_path}")
    assert missing.returncode == 2
    assert "state.json does not exist" in missing.stderr
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state.json").write_text(json.dumps(
        {"version": 1, "round": 1, "overrides": ["task=digits", "rounds=3"], "plan": {}, "progress": Progress().to_json()}))
    changed = simulate(f"resume={tmp_path}", "rounds=5")
    assert changed.returncode == 2
    assert "rounds=5 would change it midway" in changed.stderr
    state = json.loads((tmp_path / "checkpoints" / "state.json").read_text())
    (tmp_path / "checkpoints" / "state.json").write_text(json.dumps({**state, "round": 3}))
    finished = simulate(f"resume={tmp_path}")
    assert finished.returncode == 2
    assert "already completed all its 3 rounds" in finished.stderr
