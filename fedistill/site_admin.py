"""The coordinator's commands about its sites, by name: `register`, `unregister` and `status`.

They talk to the SuperLink through `flwr supernode ...` and keep the coordinator's register of
names (common.site_registry) in its state folder, the one `fedistill coordinator --state` uses.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
import subprocess
import tempfile
from pathlib import Path

from common.site_registry import SITES_FILE, SiteRegistry, site_name_of_key
from fedistill import deployment
from fedistill.console import table
from fedistill.processes import console_script

DEFAULT_STATE = Path("coordinator")  # `fedistill coordinator --state`'s default
GONE = ("unregistered", "deleted")  # what `flwr supernode ls` still lists of a removed node


def add_parsers(commands: argparse._SubParsersAction, link: argparse.ArgumentParser) -> None:
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state", type=Path, default=DEFAULT_STATE,
                       help=f"the coordinator's state folder, as given to `fedistill coordinator` (default: {DEFAULT_STATE})")

    register = commands.add_parser("register", parents=[link, state], help="admit a site's public key on the coordinator")
    register.add_argument("public_key", type=Path, help="sites/<name>.pub from `fedistill certs`")
    register.add_argument("--name", help="the site's name in reports (default: the one `fedistill certs` wrote in the key)")
    register.set_defaults(handler=run_register)

    unregister = commands.add_parser("unregister", parents=[link, state],
                                     help="remove a site: its key is refused from now on")
    unregister.add_argument("site", help="the site's name, as `fedistill status` lists it")
    unregister.set_defaults(handler=run_unregister)

    status = commands.add_parser("status", parents=[link, state],
                                 help="the registered sites by name: online or not, last round, refusals")
    status.set_defaults(handler=run_status)


def registry_in(state: Path) -> SiteRegistry:
    if not state.is_dir():
        raise ValueError(f"no coordinator state folder {state}: run this on the coordinator's machine, in the folder "
                         "`fedistill coordinator` was started in, or give its --state DIR")
    return SiteRegistry(state / SITES_FILE)


def flwr_supernode(link: deployment.Link, *args: str) -> dict:
    """`flwr supernode ARGS <the coordinator> --format json`'s answer; ValueError with Flower's words if it fails."""
    with tempfile.TemporaryDirectory(prefix="fedistill-flwr-") as home:
        link.write_flwr_home(Path(home))
        done = subprocess.run([console_script("flwr"), "supernode", *args, deployment.CONNECTION, "--format", "json"],
                              env=deployment.flwr_env(Path(home)), capture_output=True, text=True)
    try:
        answer = json.loads(done.stdout[done.stdout.find("{"):])
    except ValueError:
        answer = {}
    if done.returncode != 0 or not answer.get("success"):
        said = answer.get("error-message") or (done.stdout + done.stderr).strip()
        raise ValueError(f"`flwr supernode {args[0]}` failed on {link.address}: {said}")
    return answer


def run_register(args: argparse.Namespace) -> int:
    registry = registry_in(args.state)
    name = args.name or site_name_of_key(args.public_key)
    registry.check_free(name)
    answer = flwr_supernode(deployment.link_of(args), "register", str(args.public_key), "--name", name)
    node_id = int(answer["node-id"])
    registry.add(node_id, name)
    print(f"fedistill: {name} registered as node {node_id}; that site can now start "
          "`fedistill site --config <its site file>`")
    return 0


def run_unregister(args: argparse.Namespace) -> int:
    registry = registry_in(args.state)
    node_id = registry.node_of(args.site)
    if node_id is None:
        known = ", ".join(sorted(registry.names().values())) or "none"
        raise ValueError(f"no site named {args.site!r} is registered in {registry.path} (registered: {known})")
    flwr_supernode(deployment.link_of(args), "unregister", str(node_id))
    registry.remove(node_id)
    print(f"fedistill: {args.site} (node {node_id}) unregistered: its key is refused from now on")
    return 0


def run_status(args: argparse.Namespace) -> int:
    registry = registry_in(args.state)
    nodes = {int(n["node-id"]): n for n in flwr_supernode(deployment.link_of(args), "ls")["nodes"]}
    print(format_status(registry.names(), nodes, last_run(args.state / "runs")))
    return 0


def last_run(runs: Path) -> tuple[str, dict[str, dict]] | None:
    """(the newest run's folder name, each site's last round trained, rounds trained and refusals in it),
    from its metrics.jsonl (so a run still going counts too); None before the first run."""
    folders = sorted((p for p in runs.glob("*") if (p / "metrics.jsonl").exists()), key=lambda p: p.stat().st_mtime)
    if not folders:
        return None
    run = folders[-1]
    sites: dict[str, dict] = defaultdict(lambda: {"last_round": None, "rounds_trained": 0, "refusals": []})
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name in record["trained"]:
            sites[name]["last_round"] = record["round"]
            sites[name]["rounds_trained"] += 1
        for problem in record["problems"]:
            refusals = sites[problem["site"]]["refusals"]
            if problem["status"] == "refused":
                refusals.append({"round": record["round"], "code": problem["code"]})
    finished = "" if (run / "summary.json").exists() else " (running)"
    return run.name + finished, dict(sites)


def format_status(names: dict[int, str], nodes: dict[int, dict], run: tuple[str, dict[str, dict]] | None) -> str:
    rows = [("site", "node", "status", "rounds trained", "last round", "refusals (code)")]
    sites = run[1] if run else {}
    for node_id, name in sorted(names.items(), key=lambda kv: kv[1]):
        state = nodes.get(node_id, {}).get("status", "unknown to the SuperLink")
        if name not in sites:  # not in the last run
            rows.append((name, str(node_id), state, "-", "-", "-"))
            continue
        entry = sites[name]
        refusals = ", ".join(f"round {r['round']} ({r['code']})" for r in entry["refusals"])
        last = "-" if entry["last_round"] is None else str(entry["last_round"])
        rows.append((name, str(node_id), state, str(entry["rounds_trained"]), last, refusals or "-"))
    unnamed = sorted(n for n in set(nodes) - set(names) if nodes[n]["status"] not in GONE)
    lines = table(rows)
    lines.append(f"last run (the rounds above): {run[0]}" if run else "no run yet")
    if unnamed:
        lines.append(f"nodes registered without `fedistill register` (no name): {', '.join(map(str, unnamed))}")
    return "\n".join(lines)

