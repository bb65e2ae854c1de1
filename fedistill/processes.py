"""Child processes of fedistill's commands: free ports, console scripts, start, wait, stop by PID.

Every Flower process a command or test starts is a child in its own session; stopping it
sends SIGTERM to its process group, then kills by PID whatever is left of its group, its
descendants, and (given its FLWR_HOME) anything that still runs with that FLWR_HOME.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str) -> str:
    """A console script of this Python environment (not whatever is first on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def wait_until_listening(process: subprocess.Popen, port: int, *, timeout: float, name: str, log: Path) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`; raise if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s; see {log}")


def stop(process: subprocess.Popen, *, timeout: float, flwr_home: Path | None = None) -> None:
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


def run_streaming(command: list[str], *, env: dict[str, str], log: Path, echo: Callable[[str], None]) -> int:
    """Run `command` (e.g. `flwr run ... --stream`) to its end, each output line to `log` and `echo`;
    its exit code. It is stopped with everything it started, also when this is interrupted."""
    runner = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace")
    try:
        with open(log, "a") as out:
            for line in runner.stdout:
                out.write(line)
                echo(line.rstrip("\n"))
        return runner.wait()
    finally:
        stop(runner, timeout=5)


class Child:
    """A long-running child (a SuperLink, a SuperNode) in its own session, its output in `log`.

    `with Child(command, env=..., log=..., port=p, flwr_home=h) as child:` returns once the
    child listens on 127.0.0.1:`port` (no port: at once) and stops it, and all it started, on exit.
    """

    def __init__(self, command: list[str], *, env: dict[str, str], log: Path, port: int | None = None,
                 flwr_home: Path | None = None, start_timeout: float = 90.0, stop_timeout: float = 15.0):
        self.command, self.env, self.log_path, self.port = command, env, log, port
        self.flwr_home, self.start_timeout, self.stop_timeout = flwr_home, start_timeout, stop_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Child":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        try:
            if self.port is not None:
                wait_until_listening(self.process, self.port, timeout=self.start_timeout,
                                     name=Path(self.command[0]).name, log=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=self.stop_timeout, flwr_home=self.flwr_home)
            self.process = None

    def kill(self) -> None:
        """SIGKILL the child and all it started, at once: a machine that dies, not a process that leaves."""
        if self.process is not None:
            family = _family(self.process, self.flwr_home)
            for proc in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(list(family), timeout=10)
            self.process.wait()
            self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def interrupt_on_sigterm() -> None:
    """SIGTERM (e.g. from a job scheduler) unwinds like Ctrl-C, so that what a command started is stopped."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
