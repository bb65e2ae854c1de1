"""The virtual sites on a Ray cluster started apart, as the README shows (`ray start --head`, then
`RAY_ADDRESS=... fedistill simulate`), on one machine with the same settings: the cluster's
workers, which do not inherit the command's environment, play the sites under the run's policy
and keep their ledgers in the run's folder, not under conf/site.yaml's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.policy import POLICY_ENV
from common.privacy import LEDGER_FILE
from fedistill.processes import Child, console_script, free_port

pytestmark = pytest.mark.e2e


def test_a_simulation_on_a_ray_cluster_started_apart_keeps_the_runs_site_policy(tmp_path, cache_dir):
    port = free_port()
    cluster_home = tmp_path / "cluster"  # FLWR_HOME of every cluster process: found and stopped by it
    env = {key: value for key, value in os.environ.items() if key != POLICY_ENV}
    env["FLWR_HOME"] = str(cluster_home)
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_temp:  # Ray's socket paths must be short
        head = Child([console_script("ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                      "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_temp}"],
                     env=env, log=tmp_path / "ray.log", port=port, flwr_home=cluster_home, start_timeout=180)
        with head:
            run_dir = tmp_path / "run"
            done = subprocess.run(
                [sys.executable, "-m", "fedistill.cli", "simulate", "task=digits", "sites=2", "rounds=1",
                 f"run_dir={run_dir}", f"cache_dir={cache_dir}"],
                env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stdout + done.stderr + head.log_text()[-3000:]
            # The sites ran in the cluster's workers (their logs are in the head's session), none elsewhere.
            actors = [log for log in Path(ray_temp).glob("session_latest/logs/worker-*.out")
                      if "ClientAppActor" in log.read_text(errors="replace")]
            assert actors, sorted(p.name for p in Path(ray_temp).glob("session_latest/logs/*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["rounds_trained"] for s in summary["privacy"]["sites"]] == [1, 1]
    for site in ("site-0", "site-1"):  # the run's policy reached the cluster's workers: its ledgers
        assert json.loads((run_dir / "ledger" / site / LEDGER_FILE).read_text())["entries"]
