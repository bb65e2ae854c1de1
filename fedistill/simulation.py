"""Run the Flower app on a private simulation SuperLink that is always stopped afterwards.

`flwr run` on Flower's default local connection leaves a detached SuperLink running. Here
the SuperLink is our child, in its own process group, on a free loopback port, with a
private FLWR_HOME; on exit (normal, error or Ctrl-C) it gets SIGTERM, and every process it
started that is still alive after a grace period is killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import tomli_w

CONNECTION = "fedistill-sim"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this Python environment (not whatever is first on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class SimulationSuperLink:
    """`with SimulationSuperLink(workdir) as link: link.run(...)`."""

    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None, start_timeout: float = 90.0,
                 stop_timeout: float = 15.0):
        self.workdir = workdir
        self.extra_env = env or {}  # reaches every process the SuperLink starts, sites included
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.flwr_home = workdir / ".flwr"
        self.log_path = workdir / "superlink.log"
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> "SimulationSuperLink":
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [
                    _bin("flower-superlink"), "--simulation", "--insecure",
                    "--host", "127.0.0.1", "--port", str(self.port),
                    "--database", str(self.workdir / "superlink.db"),
                    "--disable-runtime-dependency-installation",
                ],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise
        try:
            self._wait_until_listening()
            self._write_connection()
        except BaseException:
            self.stop()
            raise
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

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.process.returncode}; see {self.log_path}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"flower-superlink did not listen on 127.0.0.1:{self.port} within {self.start_timeout}s")

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
        command = [
            _bin("flwr"), "run", str(app_dir), CONNECTION, "--stream",
            "--run-config", str(run_config),
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_site}",
        ]
        runner = subprocess.Popen(
            command, env=self.env(), start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        try:
            with open(self.workdir / "flower.log", "a") as log:
                for line in runner.stdout:
                    log.write(line)
                    echo(line.rstrip("\n"))
            return runner.wait()
        finally:
            _stop(runner, timeout=5)

    def stop(self) -> None:
        if self.process is None:
            return
        _stop(self.process, timeout=self.stop_timeout, flwr_home=self.flwr_home)
        self.process = None
        self._log.close()


def _stop(process: subprocess.Popen, *, timeout: float, flwr_home: Path | None = None) -> None:
    """Stop `process` (a session leader) and everything it started, by PID.

    SIGTERM goes to its process group first, for a graceful shutdown; after `timeout`
    every process still alive that belongs to the group, descends from it, or (given
    `flwr_home`) runs with that FLWR_HOME (children that changed group or lost their
    parent) is killed.
    SIGINT and SIGTERM are held off meanwhile, so a second Ctrl-C cannot cut the cleanup short.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        family = _family(process, flwr_home)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        family |= _family(process, flwr_home)
        _, alive = psutil.wait_procs(list(family), timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        if process.poll() is None:
            process.kill()
            process.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _family(process: subprocess.Popen, flwr_home: Path | None) -> set[psutil.Process]:
    """Live processes in `process`'s group, below it, or using `flwr_home`."""
    found: set[psutil.Process] = set(processes_using(flwr_home)) if flwr_home is not None else set()
    if process.poll() is None:  # once reaped, its PID may belong to someone else
        with contextlib.suppress(psutil.NoSuchProcess):
            leader = psutil.Process(process.pid)
            found |= {leader, *leader.children(recursive=True)}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if proc.pid != os.getpid() and os.getpgid(proc.pid) == process.pid:
                found.add(proc)
    return found


def processes_using(folder: Path) -> list[psutil.Process]:
    """Live processes, other than this one, whose FLWR_HOME lies in `folder`: everything a run
    started inherits it, also children that changed process group or lost their parent."""
    folder = Path(folder)
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            home = proc.environ().get("FLWR_HOME")
            if proc.pid != os.getpid() and home and (Path(home) == folder or folder in Path(home).parents):
                found.append(proc)
    return found
