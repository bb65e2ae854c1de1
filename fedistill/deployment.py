"""Flower's deployment engine for fedistill: the coordinator's SuperLink, a site's SuperNode, and
the `flwr` connection that registers sites and submits runs.

Secure by default: the SuperLink serves TLS and admits only registered site keys; plain
text needs `--insecure`, which warns.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from prometheus_client import CollectorRegistry, start_http_server

from common.config import CONF_DIR, METRICS_ENV, RUNS_ENV
from common.policy import POLICY_NODE_KEY, SitePolicy
from common.site_registry import SITES_ENV, SITES_FILE
from fedistill import app_gate
from fedistill.app_bundle import app_folder, staged_app
from fedistill.certs import dial_host, load_certificate
from fedistill.pki import subject_alt_names
from fedistill.processes import Child, console_script, free_port

CONNECTION = "fedistill"
DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT = "127.0.0.1", 9400  # a run's metrics name sites: loopback unless told
INSECURE_WARNING = ("WARNING: insecure mode: plain text and no node authentication; anyone who reaches the port can "
                    "read the traffic and join as a site. Use it on 127.0.0.1 for trials only")


@dataclass(frozen=True)
class Link:
    """How `flwr` reaches a coordinator: its address and the CA that signed its certificate."""

    address: str
    root_certificates: Path | None = None
    insecure: bool = False

    def write_flwr_home(self, flwr_home: Path) -> None:
        """A private FLWR_HOME whose default connection is this coordinator."""
        connection = {"address": self.address}
        if self.insecure:
            connection["insecure"] = True
        else:
            if self.root_certificates is None:
                raise ValueError("the coordinator's CA certificate is needed (--ca certs/ca.crt), or --insecure")
            connection["root-certificates"] = str(Path(self.root_certificates).resolve())
        flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (flwr_home / "config.toml").write_bytes(tomli_w.dumps(config).encode())


def link_of(args) -> Link:
    """The Link of a command's --coordinator, --ca and --insecure; --ca may name the folder holding ca.crt."""
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    ca = args.ca
    if ca is not None and ca.is_dir():
        if not (ca / "ca.crt").is_file():
            raise ValueError(f"--ca {ca} is a folder without ca.crt: give the deployment's CA certificate, "
                             "--ca <the folder of `fedistill certs`>/ca.crt")
        ca = ca / "ca.crt"
    if ca is not None and not ca.is_file():
        raise ValueError(f"--ca {ca} does not exist: give the deployment's CA certificate (ca.crt from `fedistill certs`)")
    return Link(args.coordinator, ca, args.insecure)


def flwr_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {}), "FLWR_HOME": str(flwr_home)}
    # Flower's own processes (flower-superexec, flwr-serverapp, flwr-clientapp) come from this environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def superlink_command(*, certs: Path | None, host: str, port: int, state: Path, insecure: bool) -> list[str]:
    command = [console_script("flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if insecure:
        return command + ["--insecure"]
    if certs is None:
        raise ValueError("the coordinator needs --certs DIR (ca.crt, server.crt, server.key from `fedistill certs`), "
                         "or --insecure for a trial on 127.0.0.1")
    files = {name: certs / name for name in ("ca.crt", "server.crt", "server.key")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: make them with `fedistill certs --out {certs} --host <name>`")
    return command + ["--ssl-ca-certfile", str(files["ca.crt"]), "--ssl-certfile", str(files["server.crt"]),
                      "--ssl-keyfile", str(files["server.key"]), "--enable-supernode-auth"]


def coordinator(*, certs: Path | None, host: str, port: int, state: Path, insecure: bool,
                metrics: tuple[str, int | None] = (DEFAULT_METRICS_HOST, None)) -> Child:
    """The coordinator's SuperLink as a child process; runs' folders go under `state`/runs, its
    register of sites is `state`/sites.json, and a run serves its metrics on `metrics` (host, port)."""
    state.mkdir(parents=True, exist_ok=True)
    command = superlink_command(certs=certs, host=host, port=port, state=state, insecure=insecure)
    extra = {RUNS_ENV: str(state / "runs"), SITES_ENV: str(state / SITES_FILE)}
    metrics_host, metrics_port = metrics
    if metrics_port is not None:
        refuse_taken(metrics_host, metrics_port)
        extra[METRICS_ENV] = f"{metrics_host}:{metrics_port}"
    env = flwr_env(state / "flwr", extra)
    return Child(command, env=env, log=state / "superlink.log", port=port, flwr_home=state / "flwr")


def coordinator_next_steps(args, log_path: Path) -> str:
    """What `fedistill coordinator` prints once it listens: where things go, and the exact commands that
    register each site key found next to its certificates, show the sites and submit a run."""
    state = args.state.resolve()
    metrics = f"{args.metrics_host}:{args.metrics_port}" if args.metrics_port else "none"
    lines = [f"fedistill: coordinator listening on {args.host}:{args.port} (log {log_path}); runs go to "
             f"{state / 'runs'}; a run's metrics on {metrics}", "next, in this folder:"]
    if args.insecure:
        host, link = ("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host), "--insecure"
    else:
        host = args.host if args.host not in ("0.0.0.0", "::") else \
            dial_host(subject_alt_names(load_certificate(args.certs / "server.crt")))
        link = f"--ca {args.certs / 'ca.crt'}"
    link = f"--coordinator {host}:{args.port} {link}" + ("" if args.state == Path("coordinator") else f" --state {args.state}")
    keys = sorted((args.certs / "sites").glob("*.pub")) if args.certs else []
    lines += [f"  fedistill register {key} {link}" for key in keys] or \
        [f"  fedistill register <a site's key, sites/NAME.pub from `fedistill certs`> {link}"]
    try:
        app = app_folder(Path.cwd()) and ""
    except ValueError:
        app = f" --app {CONF_DIR.parent}"  # the app this fedistill was installed from
    lines += [f"  fedistill status {link}", f"  fedistill submit task=digits {link}{app}"]
    return "\n".join(lines)


def refuse_taken(host: str, port: int) -> None:
    """Refuse a metrics address another process holds now, rather than find out in the first run."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"--metrics-host {host} --metrics-port {port}: cannot listen there ({err.strerror}): "
                             "another process holds the port, or the address is not this machine's. Choose a free "
                             "--metrics-port, or --metrics-port 0 for none") from None


def supernode_command(policy: SitePolicy, policy_file: Path, runtime_port: int) -> list[str]:
    link = policy.supernode
    command = [console_script("flower-supernode"), "--superlink", link.superlink, "--port", str(runtime_port),
               "--node-config", f"{POLICY_NODE_KEY}='{policy_file.resolve()}'"]
    if link.insecure:
        return command + ["--insecure"]
    missing = [key for key in ("root_certificates", "private_key") if getattr(link, key) is None]
    if missing:
        raise ValueError(f"the site file sets no supernode.{' or supernode.'.join(missing)}: give the CA certificate "
                         "and this site's key from `fedistill certs`, or supernode.insecure: true for a loopback trial")
    return command + ["--root-certificates", str(Path(link.root_certificates).expanduser()),
                      "--auth-supernode-private-key", str(Path(link.private_key).expanduser())]


def site(policy: SitePolicy, policy_file: Path, state: Path) -> Child:
    """A site's SuperNode as a child process, behind the app gate when the site pins apps."""
    if policy.name is None:
        raise ValueError(f"{policy_file} sets no name: a deployed site needs one (name: site-a), which names its "
                         "ledger folder and its metrics")
    env = flwr_env(state / "flwr")
    if policy.app_sha256:
        gate = app_gate.install_launcher(state / "bin").parent
        env |= {app_gate.APP_SHA256_ENV: " ".join(policy.app_sha256), "PATH": f"{gate}{os.pathsep}{env['PATH']}",
                app_gate.ACTIVITY_ENV: str(policy.ledger_root / policy.name)}
    command = supernode_command(policy, policy_file, free_port())
    return Child(command, env=env, log=state / "supernode.log", flwr_home=state / "flwr")


def supernode_exit_cause(log: str) -> str:
    """Why a SuperNode stopped, from its log, in the site's terms."""
    if "[code: 2004]" in log:
        return ("the coordinator does not know this site's key (Flower code 2004): send the site's .pub file to the "
                "coordinator, who runs `fedistill register`; or another SuperNode with this key is connected now "
                "(is this site running twice?)")
    failures = [line.strip() for line in log.splitlines() if "ERROR" in line or "Failed" in line or "code:" in line]
    return failures[-1] if failures else "its log says no more"


def refuse_unpinned(policy: SitePolicy, policy_file: Path) -> None:
    """A site that pins no app runs whatever code the coordinator ships, which could ignore its
    policy: refused unless its file says so on purpose."""
    if not policy.app_sha256 and not policy.allow_unpinned_apps:
        raise ValueError(f"{policy_file} pins no app (app_sha256 is empty), so any code the coordinator ships would "
                         "run at this site and could ignore its policy: add app_sha256: [<digest>] with the digest "
                         "`fedistill app-hash <the app folder you vetted>` prints, or allow_unpinned_apps: true for a "
                         "trial")


def serve_site_metrics(policy: SitePolicy) -> None:
    """The site's Prometheus endpoint on `metrics_host`:`metrics_port`, read from its ledger and activity log."""
    from common.monitoring import SiteCollector  # reads ledgers: Opacus, only for a site
    from common.privacy import Budget

    if policy.metrics_port is None:
        return
    registry = CollectorRegistry()
    registry.register(SiteCollector(policy.ledger_root / policy.name, site=policy.name,
                                    budget=Budget(policy.epsilon, policy.delta)))
    try:
        start_http_server(policy.metrics_port, addr=policy.metrics_host, registry=registry)
    except OSError as err:
        raise ValueError(f"metrics {policy.metrics_host}:{policy.metrics_port}: cannot listen ({err}); choose a free "
                         "port (metrics_port) or address (metrics_host) in the site file, or metrics_port: null") from None


def app_hash(app_dir: Path) -> str:
    """The SHA-256 of the app `flwr run APP_DIR` would ship (Flower's FAB hash; builds are reproducible)."""
    with tempfile.TemporaryDirectory(prefix="fedistill-fab-") as out, staged_app(app_dir) as app:
        done = subprocess.run([console_script("flwr"), "build", "--app", str(app)], cwd=out,
                              capture_output=True, text=True)
        fabs = list(Path(out).glob("*.fab"))
        if done.returncode != 0 or len(fabs) != 1:
            raise RuntimeError(f"flwr build failed: {done.stdout}{done.stderr}")
        return hashlib.sha256(fabs[0].read_bytes()).hexdigest()
