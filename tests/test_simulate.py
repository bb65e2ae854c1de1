"""End to end: `fedistill simulate` on real Flower processes (SuperLink, simulation engine, Ray)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedistill.processes import processes_using

pytestmark = pytest.mark.e2e  # real Flower simulations

FEDISTILL = [sys.executable, "-m", "fedistill.cli", "simulate"]
RUN_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "student.safetensors", "student.json", "student-int8.pt",
             "privacy.json", "privacy.md", "progress.png"]


def simulate(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*FEDISTILL, f"run_dir={run_dir}", *overrides], capture_output=True, text=True, timeout=900)
    leftovers = processes_using(run_dir)
    for proc in leftovers:  # clean up before failing, so one bad test does not poison the rest
        proc.kill()
    assert not leftovers, f"processes left running after fedistill exited: {leftovers}"
    return result


def finished_run(run_dir: Path, files: list[str], rounds: int) -> dict:
    """The run's summary, once its files exist and every site trained every round within its budget."""
    for name in files:
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    assert all(s["rounds_trained"] == rounds for s in summary["privacy"]["sites"])
    for s in summary["privacy"]["sites"]:
        assert 0 < s["epsilon"] <= s["budget"]
    return summary


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("e2e")
    ledger = root / "ledger"
    overrides = ["task=digits", "sites=3", "rounds=2", f"cache_dir={cache_dir}", f"site.ledger_dir={ledger}"]
    result = simulate(root / "run1", *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, overrides, result


def test_simulation_writes_every_run_file_and_the_summary_keys(first_run):
    root, _, result = first_run
    run_dir = root / "run1"
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "digits" and summary["exchange"] == "weights"
    assert summary["rounds_completed"] == 2 and summary["failed_rounds"] == {} and summary["dropped_replies"] == {}
    for key in ("params", "accuracy"):
        assert summary["teacher"][key] > 0
    assert 0 < summary["student"]["params"] < summary["teacher"]["params"]
    assert 0 <= summary["student"]["accuracy"] <= 1 and 0 <= summary["student"]["agreement"] <= 1
    assert summary["privacy"]["delta"] == 1e-5
    assert summary["communication"]["bytes_up"] > 0 and summary["communication"]["bytes_down"] > 0
    sites = summary["privacy"]["sites"]
    assert [s["site"] for s in sites] == ["site-0", "site-1", "site-2"]
    for s in sites:
        assert 0 < s["epsilon"] <= s["budget"] == 3.0
        assert s["refused_rounds"] == 0
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites_trained"] == 3 for r in rounds)
    assert "round 2/2" in result.stdout and "global student" in result.stdout
    assert (root / "ledger" / "site-0" / "ledger.json").exists() and not (run_dir / "ledger").exists()


def test_a_dp_reply_on_the_wire_holds_no_record_count_loss_or_timing(first_run):
    root, _, _ = first_run
    rounds = [json.loads(line) for line in (root / "run1" / "metrics.jsonl").read_text().splitlines()]
    for record in rounds:
        assert record["reply_items"] == ["arrays", "config/site", "config/status", "metrics/dp-steps",
                                         "metrics/epsilon-budget", "metrics/epsilon-spent", "metrics/noise-multiplier",
                                         "metrics/sample-rate"]


def test_second_run_on_the_same_ledger_refuses_once_the_budget_is_spent(first_run):
    root, overrides, _ = first_run
    result = simulate(root / "run2", *overrides)
    assert result.returncode == 1 and "no round completed" in result.stderr, result.stdout + result.stderr
    summary = json.loads((root / "run2" / "summary.json").read_text())  # written all the same
    assert summary["rounds_completed"] == 0 and summary["failed_rounds"] == {
        "0 valid replies from 3 sampled sites, fewer than federation.min_replies=1": 2}
    for s in summary["privacy"]["sites"]:
        assert s["refused_rounds"] == 2 and s["epsilon"] <= s["budget"]
    assert [s["epsilon"] for s in summary["privacy"]["sites"]] == [0.0, 0.0, 0.0]  # this run spent nothing
    assert {r["code"] for s in summary["privacy"]["sites"] for r in s["refusals"]} == {"budget"}
    ledger = json.loads((root / "ledger" / "site-0" / "ledger.json").read_text())
    assert {e["run"] for e in ledger["entries"]} and len(ledger["entries"]) == 2  # the first run's two rounds
    assert "refused" in result.stdout


def test_the_same_ledger_under_another_partition_is_refused(first_run):
    """sites=3 then sites=4 on one ledger folder: the records of every site would be charged again."""
    root, overrides, _ = first_run
    result = simulate(root / "run-4-sites", *[o.replace("sites=3", "sites=4") for o in overrides])
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((root / "run-4-sites" / "summary.json").read_text())
    assert summary["rounds_completed"] == 0
    sites = summary["privacy"]["sites"]
    assert len(sites) == 4
    assert all(r["code"] == "ledger" for s in sites for r in s["refusals"]) and all(s["refused_rounds"] == 2 for s in sites)
    assert not (root / "ledger" / "site-3" / "ledger.json").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy.delta=2"], "privacy.delta must be in (0, 1), got 2.0"),
        (["privacy=none"], "site.require_dp"),
        (["site.epsilon=1", "privacy.epsilon=3"], "exceeds the site's budget 1"),
    ],
)
def test_bad_config_is_refused_before_any_process_starts(tmp_path, overrides, message):
    result = simulate(tmp_path / "run", *overrides)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_every_flower_process(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    command = [*FEDISTILL, f"run_dir={run_dir}", "task=digits", "sites=2", "rounds=50", f"cache_dir={cache_dir}"]
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so: give the
    # command the default disposition, as a terminal would.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # wait until the federation is really running
            if "round 1/50" in line:
                break
        assert processes_using(run_dir), "the run should have Flower processes before the interrupt"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = processes_using(run_dir)
    for p in leftovers:
        p.kill()
    assert not leftovers, f"processes left running after Ctrl-C: {leftovers}"
    assert "interrupted" in proc.stdout.read()
