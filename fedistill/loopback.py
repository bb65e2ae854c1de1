"""A whole deployment on 127.0.0.1, started with fedistill's own commands, for trials, tests and
benchmarks: certificates, a coordinator (TLS, node authentication), registered sites that
each run `fedistill site` from a site file of their own. Everything is stopped by PID on exit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from fedistill.certs import make_deployment
from fedistill.processes import Child, free_port, processes_using

FEDISTILL = [sys.executable, "-m", "fedistill.cli"]
APP_DIR = Path(__file__).resolve().parent.parent
# A site loads its records and computes its teacher's outputs on them before it listens (and a
# first start fits the teacher): on a busy 2-core machine that took more than 90 s.
SITE_START_TIMEOUT_S = 600.0


def command_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(APP_DIR)}


def fedistill(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDISTILL, *args], env=command_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


class LoopbackDeployment:
    """`with LoopbackDeployment(root, {"site-a": policy, ...}) as d: d.submit("task=digits", ...)`.

    Each site's policy is a dict of site-file keys; the connection keys and a free metrics
    port are added. `root` holds the certificates, the coordinator's state (runs/ in it),
    each site's file, SuperNode state and ledger folder (`root/ledgers` unless the policy says).
    """

    def __init__(self, root: Path, sites: dict[str, dict]):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = root / "certs"
        self.ca = self.certs / "ca.crt"
        self.policies = sites
        self.link = ["--coordinator", self.address, "--ca", str(self.ca), "--state", str(root / "coordinator")]
        self.site_files: dict[str, Path] = {}
        self.metrics_ports: dict[str, int] = {}
        self.sites: dict[str, Child] = {}  # each site's `fedistill site` process
        self.coordinator = Child(
            [*FEDISTILL, "coordinator", "--certs", str(self.certs), "--host", "127.0.0.1",
             "--port", str(self.port), "--state", str(root / "coordinator"), "--metrics-port", str(free_port())],
            env=command_env(), log=root / "coordinator.out", port=self.port, flwr_home=root / "coordinator" / "flwr")
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "LoopbackDeployment":
        with self._stack as stack:
            make_deployment(self.certs, sites=list(self.policies), overwrite=True)
            stack.enter_context(self.coordinator)
            for name, policy in self.policies.items():
                self.add_site(name, policy, stack=stack)
            self._stack = stack.pop_all()
        return self

    def add_site(self, name: str, policy: dict, *, registered: bool = False,
                 stack: contextlib.ExitStack | None = None) -> Child:
        """Register site `name` (unless `registered`) and start its `fedistill site` with `policy`; it is
        stopped with the deployment."""
        if not registered:
            done = fedistill("register", str(self.certs / "sites" / f"{name}.pub"), *self.link)
            if done.returncode != 0:
                raise RuntimeError(f"registering {name} failed: {done.stdout}{done.stderr}")
        self.policies[name] = policy
        self.site_files[name] = self._write_site(name, policy)
        state = self.root / name / "node"
        self.sites[name] = (stack or self._stack).enter_context(Child(
            [*FEDISTILL, "site", "--config", str(self.site_files[name]), "--state", str(state)],
            env=command_env(), log=self.root / name / "site.out", port=self.metrics_ports[name],
            flwr_home=state / "flwr", start_timeout=SITE_START_TIMEOUT_S))
        return self.sites[name]

    def restart_site(self, name: str, **changes) -> None:
        """Stop site `name`, change its site file (e.g. app_sha256=[old, new]) and start it again."""
        self.sites[name].stop()
        self.policies[name] = {**self.policies[name], **changes}
        self.site_files[name] = self._write_site(name, self.policies[name])
        self.sites[name].__enter__()

    def __exit__(self, *exc) -> None:
        self._stack.close()
        left = processes_using(self.root)
        if left:
            raise RuntimeError(f"processes of the deployment in {self.root} outlived it: {left}")

    def restart_coordinator(self) -> None:
        """Kill the coordinator and everything it started (its SuperLink, a running ServerApp) as a
        machine that dies, and start it again on its state folder and port."""
        self.coordinator.kill()
        self.coordinator.__enter__()

    def _write_site(self, name: str, policy: dict) -> Path:
        self.metrics_ports.setdefault(name, free_port())
        values = {"name": name, "ledger_dir": str(self.root / "ledgers"),
                  "supernode": {"superlink": self.address, "root_certificates": str(self.ca),
                                "private_key": str(self.certs / "sites" / f"{name}.key")},
                  **policy, "metrics_port": self.metrics_ports[name]}
        path = self.root / name / "site.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(values))
        return path

    def submit(self, *overrides: str, app: Path = APP_DIR, timeout: float = 900) -> subprocess.CompletedProcess:
        return fedistill("submit", *overrides, "--coordinator", self.address, "--ca", str(self.ca), "--app", str(app),
                         timeout=timeout)

    def submit_command(self, *overrides: str) -> list[str]:
        return [*FEDISTILL, "submit", *overrides, "--coordinator", self.address, "--ca", str(self.ca), "--app", str(APP_DIR)]

    def runs(self) -> list[Path]:
        return sorted((self.root / "coordinator" / "runs").glob("*"))
