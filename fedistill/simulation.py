"""Run the Flower app on a private simulation SuperLink that is always stopped afterwards.

`flwr run` on Flower's default local connection leaves a detached SuperLink running. Here
the SuperLink is our child, in its own process group, on a free loopback port, with a
private FLWR_HOME; on exit (normal, error or Ctrl-C) it gets SIGTERM, and every process it
started that is still alive after a grace period is killed by PID.

`fedistill simulate` prepares a run (config, site policy, the teacher's outputs) with torch
loaded, then replaces its process with `python -m fedistill.simulation` (`hand_over`), which
runs Flower and prints the results without torch: the command's process holds a few dozen
MB, not a model stack, while the sites train.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NoReturn

import tomli_w

from common.config_base import POLICY_ENV
from fedistill.app_bundle import staged_app
from fedistill.console import INTERRUPTED, ProgressOnly, final_table
from fedistill.processes import Child, console_script, free_port, interrupt_on_sigterm, run_streaming
from fedistill.ray_hook import FORWARD_ENV, HOOK

CONNECTION = "fedistill-sim"
RAY_HOOK_ENV = "RAY_RUNTIME_ENV_HOOK"
# Ray gives its node a fixed 30 s to start (ray/_private/node.py). On a busy machine that can run out
# before any ClientApp exists: no site has trained or spent anything, and the run can be submitted again.
RAY_START_TIMEOUT = "The current node timed out during startup"
RAY_START_ATTEMPTS = 2


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
        """`flwr run` the app; every log line goes to flower.log and to `echo`. Returns flwr's exit code.
        A run whose Ray did not start is submitted once more, and says so."""
        with staged_app(app_dir) as app:
            command = [
                console_script("flwr"), "run", str(app), CONNECTION, "--stream",
                "--run-config", str(run_config),
                "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_site}",
            ]
            for attempt in range(1, RAY_START_ATTEMPTS + 1):
                ray_failed = []

                def watch(line: str) -> None:
                    if RAY_START_TIMEOUT in line:
                        ray_failed.append(line)
                    echo(line)

                code = run_streaming(command, env=self.env(), log=self.workdir / "flower.log", echo=watch)
                if not ray_failed:
                    return code
                again = "; submitting the run again" if attempt < RAY_START_ATTEMPTS else ""
                print(f"fedistill: Ray did not start within its fixed 30 s (the machine is busy), so no site has "
                      f"trained{again}", file=sys.stderr)
            return code

    def stop(self) -> None:
        self.superlink.stop()


@dataclass(frozen=True)
class PreparedRun:
    """A simulation `fedistill simulate` has prepared: what running it needs, and nothing heavy."""

    app_dir: str
    run_dir: str
    run_config: str
    policy_file: str
    sites: int
    cpus_per_site: int
    max_failed_rounds: int
    verbose: bool = False

    def hand_over(self) -> NoReturn:
        """Replace this process (same PID, same output) with `python -m fedistill.simulation` running this run."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fedistill.simulation", json.dumps(asdict(self))])

    def run(self) -> int:
        """Run it on a private SuperLink and print the results; the command's exit code."""
        run_dir = Path(self.run_dir)
        echo = print if self.verbose else ProgressOnly()
        if os.environ.get(RAY_HOOK_ENV, HOOK) != HOOK:
            print(f"fedistill: {RAY_HOOK_ENV} is set ({os.environ[RAY_HOOK_ENV]}); fedistill simulate sets its own, "
                  "which carries the sites' policy to Ray's workers: unset it", file=sys.stderr)
            return 2
        with SimulationSuperLink(run_dir, env={POLICY_ENV: self.policy_file, RAY_HOOK_ENV: HOOK,
                                                  FORWARD_ENV: POLICY_ENV}) as link:
            code = link.run(Path(self.app_dir), Path(self.run_config), num_supernodes=self.sites,
                            cpus_per_site=self.cpus_per_site, echo=echo)
        summary_path = run_dir / "summary.json"
        if code != 0 or not summary_path.exists():
            print(f"fedistill: the run failed (flwr exit code {code}); logs: {run_dir / 'flower.log'}", file=sys.stderr)
            return 1
        summary = json.loads(summary_path.read_text())
        print(final_table(summary))
        print(f"fedistill: results in {run_dir}")
        if any(reason.startswith("not run") for reason in summary["failed_rounds"]):
            print(f"fedistill: the run stopped after {self.max_failed_rounds} failed rounds in a row (reasons "
                  f"above); once the cause is fixed, run the rounds left with `fedistill simulate resume={run_dir}`",
                  file=sys.stderr)
        if not summary["rounds_completed"]:
            print("fedistill: no round completed, so the global student is the one the server started from (the "
                  "reasons are above)", file=sys.stderr)
            return 1
        return 0


def main(argv: list[str]) -> int:
    interrupt_on_sigterm()
    try:
        return PreparedRun(**json.loads(argv[0])).run()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
