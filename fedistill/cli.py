"""The `fedistill` command: wires the config, the task cache and the Flower processes together."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w
from omegaconf import OmegaConf

from common.config import CONF_DIR, Config, ConfigError, load_config
from common.policy import load_policy
from common.request import request_of
from fedistill import audit, certs, deployment, frontier, kit, site_admin
from fedistill.app_bundle import app_folder, staged_app
from fedistill.console import INTERRUPTED, ProgressOnly
from fedistill.processes import console_script, interrupt_on_sigterm, run_streaming

if TYPE_CHECKING:
    from server.resume import SavedRun

POLICY_FILE = "site-policy.yaml"  # the virtual sites' policy, written by this command into the run directory

APP_DIR = CONF_DIR.parent  # the folder with pyproject.toml, server/, client/, common/, conf/


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # force: importing Opacus (through the privacy ledger) already gave the root logger a handler
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    interrupt_on_sigterm()
    try:
        if args.command == "simulate":
            return run_simulation(args.overrides, verbose=args.verbose)
        return args.handler(args)
    except (ConfigError, ValueError) as err:
        print(f"fedistill {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with Hydra overrides allowed after options too (`audit task=lm --canaries
    200 seed=1`): argparse takes only the first run of positionals, and its intermixed parsing
    does not work with subcommands."""
    commands = parser()
    args, rest = commands.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        commands.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def parser() -> argparse.ArgumentParser:
    """Every subcommand. Each imports torch, Opacus and the tasks only when it runs and needs
    them, so `fedistill --help`, `register` or `submit` start in about a second."""
    parser = argparse.ArgumentParser(prog="fedistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    simulate = commands.add_parser(
        "simulate",
        help="run N virtual sites on this machine",
        description="Run a federated DP distillation on Flower's simulation engine. "
        "Arguments are Hydra overrides, e.g. task=digits sites=8 rounds=10 privacy.epsilon=1; "
        "site.KEY=VALUE sets the virtual sites' own policy (conf/site.yaml), e.g. site.ledger_dir=~/ledgers",
    )
    simulate.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    simulate.add_argument("-v", "--verbose", action="store_true", help="show all of Flower's log, not only progress")
    frontier.add_parser(commands)
    audit.add_parser(commands)
    add_deployment_commands(commands)
    certs.add_parser(commands)
    kit.add_parser(commands)
    add_site_check_command(commands)
    return parser


def add_deployment_commands(commands) -> None:
    link = argparse.ArgumentParser(add_help=False)
    link.add_argument("--coordinator", required=True, help="the coordinator's SuperLink, host:port")
    link.add_argument("--ca", type=Path, help="the deployment's CA certificate (ca.crt from `fedistill certs`)")
    link.add_argument("--insecure", action="store_true", help="plain text (a coordinator started with --insecure)")

    coordinator = commands.add_parser("coordinator", help="start the coordinator's SuperLink (TLS, registered sites)")
    coordinator.add_argument("--certs", type=Path, help="folder with ca.crt, server.crt, server.key (`fedistill certs`)")
    coordinator.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    coordinator.add_argument("--port", type=int, default=8000, help="the one HTTPS port sites and `flwr` use")
    coordinator.add_argument("--state", type=Path, default=Path("coordinator"),
                             help="the SuperLink's database, logs and the runs' folders (runs/)")
    coordinator.add_argument("--insecure", action="store_true", help="plain text, no node authentication (warns)")
    coordinator.add_argument("--metrics-host", default=deployment.DEFAULT_METRICS_HOST,
                             help="address a run serves its Prometheus metrics on (default: %(default)s, this machine "
                                  "only; 0.0.0.0 for a Prometheus elsewhere)")
    coordinator.add_argument("--metrics-port", type=int, default=deployment.DEFAULT_METRICS_PORT,
                             help="port of those metrics (default: %(default)s; 0: none). A run's "
                                  "federation.metrics_port overrides it")
    coordinator.set_defaults(handler=run_coordinator)

    site = commands.add_parser("site", help="start this site's SuperNode and metrics endpoint from its site file")
    site.add_argument("--config", type=Path, required=True, help="the site file (keys of conf/site.yaml)")
    site.add_argument("--state", type=Path, help="the SuperNode's own files (default: a folder next to the ledger)")
    site.set_defaults(handler=run_site)

    site_admin.add_parsers(commands, link)

    submit = commands.add_parser("submit", parents=[link], help="run the app on a coordinator's registered sites")
    submit.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=digits rounds=5 privacy.epsilon=1")
    submit.add_argument("--app", type=Path, default=Path("."),
                        help="the app folder to ship (default: the current folder)")
    submit.set_defaults(handler=run_submit)

    app_hash = commands.add_parser("app-hash", help="the SHA-256 of the app a coordinator ships (for site app_sha256)")
    app_hash.add_argument("app", type=Path, nargs="?", default=Path("."),
                          help="the app folder (default: the current folder)")
    app_hash.set_defaults(handler=lambda args: print(deployment.app_hash(app_folder(args.app))) or 0)

    assets = commands.add_parser("assets", help="the teacher and public-set SHA-256 a run announces (for site pins)")
    assets.add_argument("overrides", nargs="*", help="the run's Hydra overrides, e.g. task=digits")
    assets.set_defaults(handler=run_assets)


def add_site_check_command(commands) -> None:
    check = commands.add_parser(
        "site-check", help="check a site before it joins",
        description="Check this site's file, records, teacher and public set, privacy ledger, certificate, key "
                    "and that the coordinator answers. Exit code 0 when the site is ready to join.")
    check.add_argument("--config", required=True, type=Path, metavar="FILE", help="the site file (site.yaml)")
    check.add_argument("--task", metavar="NAME",
                       help="the task to check, a name of conf/task/ such as digits or a task source the site lists "
                            "(default: the first of the site file's task_sources)")
    check.set_defaults(handler=run_site_check)


def run_site_check(args) -> int:
    from fedistill import sitecheck

    return sitecheck.run(args)


def run_coordinator(args) -> int:
    if args.insecure:
        print(deployment.INSECURE_WARNING, file=sys.stderr)
    metrics = (args.metrics_host, args.metrics_port or None)
    with deployment.coordinator(certs=args.certs, host=args.host, port=args.port, state=args.state.resolve(),
                                insecure=args.insecure, metrics=metrics) as link:
        print(deployment.coordinator_next_steps(args, link.log_path), flush=True)
        return link.process.wait()


def run_site(args) -> int:
    from common.site_config import check_records

    policy = load_policy(args.config)
    deployment.refuse_unpinned(policy, args.config)
    if policy.supernode.insecure:
        print(deployment.INSECURE_WARNING, file=sys.stderr)
    for line in check_records(policy):  # once, whatever a run will ask: a site whose records fail does not start
        print(f"fedistill: {line}", flush=True)
    state = (args.state or policy.ledger_root / f"{policy.name}-supernode").resolve()
    with deployment.site(policy, args.config, state) as node:
        deployment.serve_site_metrics(policy)
        print(f"fedistill: site {policy.name} connecting to {policy.supernode.superlink} (log {node.log_path}); "
              f"metrics on {policy.metrics_host}:{policy.metrics_port}; ledger {policy.ledger_root / policy.name}\n"
              f"check it with `fedistill site-check --config {args.config}`", flush=True)
        code = node.process.wait()
    if code != 0:
        print(f"fedistill site: the SuperNode stopped (exit code {code}): "
              f"{deployment.supernode_exit_cause(node.log_text())}\nrun `fedistill site-check --config {args.config}`; "
              f"the whole log is {node.log_path}", file=sys.stderr)
    return code


def run_submit(args) -> int:
    overrides = args.overrides if any(o.startswith("federation=") for o in args.overrides) else \
        ["federation=deployment", *args.overrides]
    load_config(overrides)  # refuse a bad config here, not in the ServerApp
    app = app_folder(args.app)
    with tempfile.TemporaryDirectory(prefix="fedistill-submit-") as home:
        home = Path(home)
        deployment.link_of(args).write_flwr_home(home / "flwr")
        run_config = write_run_config(home, overrides)
        with staged_app(app) as staged:
            command = [console_script("flwr"), "run", str(staged), deployment.CONNECTION, "--stream",
                       "--run-config", str(run_config)]
            code = run_streaming(command, env=deployment.flwr_env(home / "flwr"), log=home / "flower.log",
                                 echo=ProgressOnly())
    return code


def run_assets(args) -> int:
    from common import payload as P
    from common.tasks import build_task

    task = build_task(load_config(args.overrides))
    announced = P.asset_manifest(task)
    print(f"teacher_sha256: {announced[P.TEACHER_SHA256]}\npublic_sha256: {announced[P.PUBLIC_SHA256]}")
    return 0


def pin(overrides: list[str], key: str, value: str) -> list[str]:
    """`overrides` with `key` set to `value` (replacing what the user gave)."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    return kept + [f"{key}={json.dumps(value)}"]


def split_site_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the run's overrides, the virtual sites' policy overrides `site.KEY=VALUE` without `site.`)."""
    site = [o.split(".", 1)[1] for o in overrides if o.startswith("site.")]
    return [o for o in overrides if not o.startswith("site.")], site


def resolve_paths(overrides: list[str]) -> tuple[list[str], Config]:
    """Make every path absolute so that the apps, which run elsewhere, agree with this command."""
    config = load_config(overrides)
    run_dir = Path(config.run_dir or Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    overrides = pin(overrides, "run_dir", str(run_dir))
    overrides = pin(overrides, "cache_dir", str(config.cache_path.resolve()))
    return overrides, load_config(overrides)


def write_run_config(run_dir: Path, overrides: list[str]) -> Path:
    """The Flower run config that carries the overrides to both apps."""
    path = run_dir / "run_config.toml"
    path.write_bytes(tomli_w.dumps({"overrides": shlex.join(overrides)}).encode())
    return path


def run_simulation(overrides: list[str], *, verbose: bool = False) -> int:
    """Prepare the run the overrides describe here, then hand this process over to Flower's part
    (fedistill.simulation.PreparedRun); returns only when the run is refused before that."""
    from common.site_config import simulated_site_policy
    from common.tasks import build_task
    from fedistill.simulation import PreparedRun

    overrides, site_overrides = split_site_overrides(overrides)
    saved = resumed_run(overrides)
    if saved is not None:
        overrides = saved.overrides_for(overrides)
        if site_overrides:
            raise ConfigError(f"resume= keeps the sites' policy of the run ({saved.run_dir / POLICY_FILE}); "
                              f"{' '.join('site.' + o for o in site_overrides)} would change it midway")
    overrides, config = resolve_paths(overrides)
    run_dir = Path(config.run_dir)
    if saved is not None:
        saved.check_rounds_left(config.rounds)
        policy = load_policy(run_dir / POLICY_FILE)
    else:
        policy = simulated_site_policy(config, site_overrides)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run_dir {run_dir} is not empty (an earlier run's files would mix with this one's): "
                              f"choose another run_dir, or continue that run with resume={run_dir}")
    problems = policy.violations(request_of(config))
    if problems:
        raise ConfigError("every site would refuse this run: " + "; ".join(problems)
                          + ". In simulation you set the sites' policy too, with site.KEY=VALUE")
    run_dir.mkdir(parents=True, exist_ok=True)
    if saved is not None:
        print(f"fedistill: resuming the run in {run_dir} after round {saved.round} of {config.rounds}")
        for stale in ("summary.json", "superlink.db", "superlink.db-shm", "superlink.db-wal"):  # the dead run's
            (run_dir / stale).unlink(missing_ok=True)
    print(f"fedistill: run directory {run_dir}")
    print(f"fedistill: preparing task {config.task.name} (the teacher is fitted and its outputs computed once, "
          "then cached)")
    task = build_task(config)
    prepare(task, config)
    run_config = write_run_config(run_dir, overrides)
    policy_file = run_dir / POLICY_FILE
    if saved is None:
        policy_file.write_text(OmegaConf.to_yaml(OmegaConf.structured(policy)))
    print(f"fedistill: {config.sites} sites, {config.rounds} rounds, site policy {policy_file}, starting Flower")
    prepared = PreparedRun(app_dir=str(APP_DIR), run_dir=str(run_dir), run_config=str(run_config),
                           policy_file=str(policy_file), sites=config.sites,
                           cpus_per_site=config.federation.cpus_per_site,
                           max_failed_rounds=config.federation.max_failed_rounds, verbose=verbose)
    prepared.hand_over()  # the rest runs without torch in memory


def resumed_run(overrides: list[str]) -> SavedRun | None:
    """The saved run that `resume=<run_dir>` among the overrides names (server.resume), or None."""
    from server.resume import SavedRun

    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "resume"]
    if not given or given[-1] in ("", "null"):
        return None
    value = given[-1]
    if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return SavedRun.read(Path(value).expanduser().resolve())


def prepare(task, config: Config) -> None:
    """Everything the run needs from the teacher, computed here once and cached, rather than
    by every virtual site's process at once: the evaluation's, the public inputs' and each
    site's targets."""
    from common.partition import num_shards

    kinds = task.objective(config.distill).target_kinds
    task.evaluator()
    task.teacher_targets(task.public_inputs(), kinds)
    for site in range(min(config.sites, num_shards(config.sites, config.task.sites_per_record))):  # one per shard
        task.teacher_targets(task.private_data(site, config.sites).tensors[0], kinds)


if __name__ == "__main__":
    sys.exit(main())
