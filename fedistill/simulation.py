"""Run the Flower app on a private simulation SuperLink that is always stopped afterwards.

`flwr run` on Flower's default local connection leaves a detached SuperLink running. Here
the SuperLink is our child, in its own process group, on a free loopback port, with a
private FLWR_HOME; on exit (normal, error or Ctrl-C) it gets SIGTERM, and every process it
started that is still alive after a grace period is killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable

import tomli_w

from fedistill.app_bundle import staged_app
from fedistill.processes import Child, console_script, free_port, run_streaming

CONNECTION = "fedistill-sim"


class SimulationSuperLink:
    """`with SimulationSuperLink(workdir) as link: link.run(...)`."""

    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None, start_timeout: float = 90.0,
                 stop_timeout: float = 15.0):
        self.workdir = workdir
        self.extra_env = env or {}  # reaches every process the SuperLink starts, sites included
        self.flwr_home = workdir / ".flwr"
        self.port = free_port()
        self.superlink = Child(
            [
                console_script("flower-superlink"), "--simulation", "--insecure",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(workdir / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
            env=self.env(), log=workdir / "superlink.log", port=self.port, flwr_home=self.flwr_home,
            start_timeout=start_timeout, stop_timeout=stop_timeout,
        )

    def __enter__(self) -> "SimulationSuperLink":
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.superlink)
            self._write_connection()
            stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        # The venv's console scripts (flwr-serverapp, flwr-simulation) must be found first.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _write_connection(self) -> None:
        config = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True},
            }
        }
        (self.flwr_home / "config.toml").write_bytes(tomli_w.dumps(config).encode())

    def run(self, app_dir: Path, run_config: Path, *, num_supernodes: int, cpus_per_site: int,
            echo: Callable[[str], None]) -> int:
        """`flwr run` the app; every log line goes to flower.log and to `echo`. Returns flwr's exit code."""
        with staged_app(app_dir) as app:
            command = [
                console_script("flwr"), "run", str(app), CONNECTION, "--stream",
                "--run-config", str(run_config),
                "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_site}",
            ]
            return run_streaming(command, env=self.env(), log=self.workdir / "flower.log", echo=echo)

    def stop(self) -> None:
        self.superlink.stop()
