"""Plain `flwr run` as a Flower user types it first: Flower's default local simulation, the
built-in defaults, no run config. Flower leaves its local SuperLink running after the run; the
test stops it, and everything it started, by PID.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedistill.processes import console_script, free_port, processes_using
from fedistill.simulation import RAY_START_TIMEOUT

pytestmark = pytest.mark.e2e  # Flower's own local SuperLink and simulation

ROOT = Path(__file__).resolve().parents[1]


def test_plain_flwr_run_completes_on_the_defaults_and_says_where_its_run_directory_is(tmp_path, cache_dir):
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "XDG_CACHE_HOME": str(Path(cache_dir) / "xdg"),
           # Flower's local SuperLink listens on fixed ports unless told otherwise: free ones, so tests may run side by side
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # as a user has it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv, activated
    try:
        # Flower gives its local SuperLink a fixed 15 s to start, and Ray its node 30 s; on a busy 2-core
        # machine running other federations that is sometimes too little. Only those messages are tried
        # again, once (`fedistill simulate` does the same for Ray's).
        for _ in range(2):
            done = subprocess.run([console_script("flwr"), "run", str(ROOT), "--stream"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=1500)
            if not any(said in done.stdout + done.stderr
                       for said in ("Failed to start local SuperLink within", RAY_START_TIMEOUT)):
                break
    finally:
        left = processes_using(home)  # Flower's detached local SuperLink and its SuperExec
        for process in left:
            process.kill()
        psutil.wait_procs(left, timeout=10)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output and "ERROR" not in output, output
    said = re.findall(r"finished: results, the global student and the privacy report in (\S+)", output)
    assert said, output
    run_dir = Path(said[-1])
    assert run_dir.parent == tmp_path / "outputs"  # the ServerApp's working directory: where `flwr run` was typed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == summary["rounds_planned"] == 10
    assert {s["site"] for s in summary["privacy"]["sites"]} == {"site-0", "site-1"}  # Flower's 2 virtual SuperNodes
    assert not processes_using(home)
