"""`fedistill simulate` on a Ray cluster that was started apart from it, as the README shows for
runs that outgrow one machine: a head node on 127.0.0.1 here, reached through RAY_ADDRESS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedistill.processes import Child, console_script, free_port, processes_using

pytestmark = pytest.mark.e2e


def test_a_simulation_runs_its_sites_on_an_existing_ray_cluster(tmp_path, cache_dir):
    port, home = free_port(), tmp_path / "cluster"
    # Ray's socket paths must stay under 108 characters: its own short folder under /tmp.
    ray_dir = Path(tempfile.mkdtemp(prefix="fedistill-ray-"))
    head = Child([console_script("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                  "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={ray_dir}", "--block"],
                 env={**os.environ, "FLWR_HOME": str(home)}, log=tmp_path / "ray.log", port=port, flwr_home=home,
                 start_timeout=120)
    run_dir = tmp_path / "run"
    try:
        with head:
            result = subprocess.run(
                [sys.executable, "-m", "fedistill.cli", "simulate", f"run_dir={run_dir}", "task=digits", "sites=2",
                 "rounds=1", f"cache_dir={cache_dir}"],
                env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True, timeout=900)
            logs = {f.name: f.read_text(errors="replace") for f in (ray_dir / "session_latest" / "logs").glob("*")
                    if f.is_file()}
    finally:
        for left in processes_using(run_dir):
            left.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "summary.json").exists()
    # The simulation joined the cluster as a driver, and the cluster's workers ran the sites.
    assert any(name.startswith("python-core-driver-") for name in logs)
    assert any("ClientAppActor" in text for name, text in logs.items() if name.startswith("worker-"))
    assert not processes_using(home), "the cluster's processes outlived the test"
