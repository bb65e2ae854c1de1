"""End to end: `fedistill simulate` on real Flower processes (SuperLink, simulation engine, Ray)."""

from __future__ import annotations

import json
import shutil
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
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((root / "run2" / "summary.json").read_text())
    assert summary["rounds_completed"] == 0
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
    assert result.returncode == 0, result.stdout + result.stderr
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


@pytest.mark.parametrize(
    "extra",
    [
        ["exchange=logits", "exchange.compression=float16"],
        ["exchange=logits", "exchange.broadcast=logits", "exchange.compression=topk",
         "exchange.site_students=[{hidden:[16]},{hidden:[32]},{hidden:[16,16]}]"],
    ],
    ids=["logits-broadcast-weights", "logits-broadcast-logits-mixed-students"],
)
def test_logits_exchange_runs_end_to_end_with_the_same_run_files(tmp_path, cache_dir, extra):
    run_dir = tmp_path / "run"
    result = simulate(run_dir, "task=digits", "sites=3", "rounds=2", f"cache_dir={cache_dir}",
                      "exchange.server.epochs=20", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exchange"] == "logits" and summary["rounds_completed"] == 2
    public_rows = 90  # 5% of digits' 1,797 images
    per_site = summary["communication"]["bytes_up_per_site_round"]
    payload, arrays = (public_rows * 10 * 2, 1) if "exchange.compression=float16" in extra else (public_rows * 3 * (2 + 2), 2)
    assert payload <= per_site <= payload + 128 * arrays  # each array also carries a small .npy header
    assert "log-probabilities on the public inputs" in (run_dir / "privacy.md").read_text()


FAULTY_CLIENT = '''
"""Test only: the honest ClientApp, but sites 1-4 corrupt their logits before replying."""
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

import client.app as honest
from common import payload as P

app = ClientApp()


@app.train()
def train(msg, context):
    reply = honest.train(msg, context)
    site = int(context.node_config["partition-id"])
    if site == 0:
        return reply
    logits = reply.content[P.LOGITS]["logits"].numpy()
    bad = {
        1: np.full_like(logits, np.nan),
        2: np.full_like(logits, np.inf),
        3: logits[:-1],
        4: np.zeros((len(logits) * 40, logits.shape[1]), dtype=np.float32),
    }[site]
    reply.content[P.LOGITS] = ArrayRecord({"logits": Array(bad)})
    return reply
'''


def test_bad_replies_are_dropped_and_counted_while_the_run_completes(tmp_path, cache_dir, write_policy):
    from common.policy import POLICY_ENV
    from fedistill.cli import APP_DIR, resolve_paths, write_run_config
    from fedistill.simulation import SimulationSuperLink

    app_dir = tmp_path / "app"
    for part in ("common", "server", "client", "conf"):
        shutil.copytree(APP_DIR / part, app_dir / part, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (APP_DIR / "pyproject.toml").read_text().replace('"client.app:app"', '"faulty_client:app"')
    pyproject = pyproject.replace('"client/**/*.py",', '"client/**/*.py", "faulty_client.py",')
    (app_dir / "pyproject.toml").write_text(pyproject)
    (app_dir / "faulty_client.py").write_text(FAULTY_CLIENT)
    overrides, config = resolve_paths(["task=digits", "sites=5", "rounds=1", "exchange=logits",
                                       "exchange.max_reply_mb=0.05", "exchange.server.epochs=5",
                                       f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}"])
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    try:
        policy = write_policy(tmp_path / "site.yaml", ledger_dir=str(tmp_path / "ledger"))
        with SimulationSuperLink(run_dir, env={POLICY_ENV: str(policy)}) as link:
            code = link.run(app_dir, write_run_config(run_dir, overrides), num_supernodes=5, cpus_per_site=2, echo=lambda line: None)
    finally:
        leftovers = processes_using(run_dir)
        for proc in leftovers:
            proc.kill()
    assert code == 0 and not leftovers
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert summary["dropped_replies"] == {"site-1": 1, "site-2": 1, "site-3": 1, "site-4": 1}
    [round_one] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert round_one["sites_trained"] == 1 and round_one["sites_invalid"] == 4
    reasons = {p["site"]: p["reason"] for p in round_one["problems"]}
    assert "NaN or infinite" in reasons["site-1"] and "NaN or infinite" in reasons["site-2"]
    assert "expected float32[90, 10]" in reasons["site-3"]
    assert "exceeds the limit" in reasons["site-4"]
    assert 0 < summary["student"]["accuracy"] <= 1


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
