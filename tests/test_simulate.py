"""End to end: `fedistill simulate` on real Flower processes (SuperLink, simulation engine, Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

FEDISTILL = [sys.executable, "-m", "fedistill.cli", "simulate"]
RUN_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "student.safetensors", "student.json",
             "privacy.json", "privacy.md", "progress.png"]


def _processes_using(folder: Path) -> list[psutil.Process]:
    """Processes whose FLWR_HOME lies in `folder`: everything the run started inherits it."""
    found = []
    for proc in psutil.process_iter():
        try:
            if str(folder) in proc.environ().get("FLWR_HOME", ""):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def simulate(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*FEDISTILL, f"run_dir={run_dir}", *overrides], capture_output=True, text=True, timeout=900)
    leftovers = _processes_using(run_dir)
    for proc in leftovers:  # clean up before failing, so one bad test does not poison the rest
        proc.kill()
    assert not leftovers, f"processes left running after fedistill exited: {leftovers}"
    return result


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("e2e")
    ledger = root / "ledger"
    overrides = ["task=digits", "sites=3", "rounds=2", f"cache_dir={cache_dir}", f"privacy.ledger_dir={ledger}"]
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
    assert summary["rounds_completed"] == 2
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


def test_second_run_on_the_same_ledger_refuses_once_the_budget_is_spent(first_run):
    root, overrides, _ = first_run
    result = simulate(root / "run2", *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((root / "run2" / "summary.json").read_text())
    assert summary["rounds_completed"] == 0
    for s in summary["privacy"]["sites"]:
        assert s["refused_rounds"] == 2 and s["epsilon"] <= s["budget"]
    first = json.loads((root / "run1" / "summary.json").read_text())
    assert [s["epsilon"] for s in summary["privacy"]["sites"]] == [s["epsilon"] for s in first["privacy"]["sites"]]
    assert "refused" in result.stdout


def test_bad_config_is_refused_before_any_process_starts(tmp_path):
    result = simulate(tmp_path / "run", "privacy.delta=2")
    assert result.returncode == 2
    assert "privacy.delta must be in (0, 1), got 2.0" in result.stderr
    assert not (tmp_path / "run").exists()
