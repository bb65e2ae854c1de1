"""The deployment commands' own checks and words: what they accept, refuse and print, without
starting Flower (the loopback deployment test runs them against a real SuperLink)."""

from __future__ import annotations

import json
import re
import shlex
import socket
from pathlib import Path

import pytest

from fedistill import cli, deployment
from fedistill.app_bundle import app_folder
from fedistill.certs import make_deployment
from fedistill.loopback import APP_DIR

ROOT = APP_DIR


def parsed(*argv: str):
    return cli.parser().parse_args(list(argv))


def test_ca_may_be_given_as_the_folder_of_fedistill_certs(tmp_path):
    make_deployment(tmp_path / "certs", sites=[])
    link = deployment.link_of(parsed("status", "--coordinator", "localhost:8000", "--ca", str(tmp_path / "certs")))
    assert link.root_certificates == tmp_path / "certs" / "ca.crt"
    with pytest.raises(ValueError, match=r"is a folder without ca.crt: .*--ca <the folder of `fedistill certs`>/ca.crt"):
        deployment.link_of(parsed("status", "--coordinator", "localhost:8000", "--ca", str(tmp_path)))
    with pytest.raises(ValueError, match="does not exist"):
        deployment.link_of(parsed("status", "--coordinator", "localhost:8000", "--ca", str(tmp_path / "nothing.crt")))


def test_app_hash_and_submit_take_the_folder_they_run_in_and_refuse_one_that_is_no_app(tmp_path, monkeypatch):
    assert parsed("app-hash").app == Path(".") and parsed("submit", "--coordinator", "x:1").app == Path(".")
    assert app_folder(ROOT) == ROOT
    monkeypatch.chdir(tmp_path)
    args = parsed("app-hash")
    with pytest.raises(ValueError, match=r"is not a Flower app's folder .* name that folder \(`fedistill app-hash DIR`"):
        args.handler(args)


def test_a_taken_metrics_port_is_refused_before_the_coordinator_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"--metrics-port {port}: cannot listen there .* Choose a free"):
            deployment.coordinator(certs=None, host="127.0.0.1", port=1, state=tmp_path, insecure=True,
                                   metrics=("127.0.0.1", port))


def test_the_coordinators_metrics_listen_on_loopback_unless_told():
    args = parsed("coordinator")
    assert (args.metrics_host, args.metrics_port) == ("127.0.0.1", 9400)
    dockerfile = (ROOT / "deploy" / "coordinator.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*?\])", dockerfile, re.S | re.M).group(1).replace("\\\n", ""))
    image_args = parsed("coordinator", *cmd)  # the image's command line is one the command accepts
    assert (image_args.metrics_host, image_args.metrics_port) == ("0.0.0.0", 9400)


def test_the_coordinator_prints_register_commands_for_the_keys_beside_its_certificates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_deployment(Path("certs"), sites=["site-a", "site-b"])
    printed = deployment.coordinator_next_steps(parsed("coordinator", "--certs", "certs"), Path("log"))
    commands = [shlex.split(line) for line in printed.splitlines() if line.startswith("  fedistill ")]
    assert [c[1] for c in commands] == ["register", "register", "status", "submit"]
    for command in commands:  # each parses as shown, and names the coordinator by its certificate's name
        args = parsed(*command[1:])
        assert args.coordinator == "localhost:8000" and args.ca == Path("certs/ca.crt")
    assert commands[0][2] == "certs/sites/site-a.pub"
    assert parsed(*commands[3][1:]).app == APP_DIR  # this folder holds no app: the installed one is named


def test_a_site_says_why_its_supernode_stopped():
    refused = "Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode."
    assert "the coordinator does not know this site's key" in deployment.supernode_exit_cause(refused)
    assert "`fedistill register`" in deployment.supernode_exit_cause(refused)
    other = "INFO : starting\nERROR : Connection refused\nINFO : bye"
    assert deployment.supernode_exit_cause(other) == "ERROR : Connection refused"


def test_a_startup_kit_holds_what_its_site_needs_filled_in_and_nothing_of_others(tmp_path, monkeypatch, cache_dir):
    import configparser
    import stat

    import jsonschema
    import yaml
    from check_jsonschema.builtin_schemas import get_builtin_schema

    from common.policy import load_policy

    monkeypatch.chdir(tmp_path)
    make_deployment(Path("certs"), sites=["site-a", "site-b"])
    args = parsed("kit", "site-a", "task=digits", f"cache_dir={cache_dir}", "--coordinator", "fl.example.org:8000",
                  "--app", str(ROOT))
    assert args.handler(args) == 0
    kit = tmp_path / "kits" / "site-a"
    assert sorted(p.name for p in kit.iterdir()) == ["README.md", "ca.crt", "compose.yaml", "fedistill-site.service",
                                                     "site.key", "site.yaml"]
    assert stat.S_IMODE(kit.stat().st_mode) == 0o700 and stat.S_IMODE((kit / "site.key").stat().st_mode) == 0o600
    assert (kit / "site.key").read_bytes() == (tmp_path / "certs" / "sites" / "site-a.key").read_bytes()
    policy = load_policy(kit / "site.yaml")  # a valid site file of every key
    assert policy.name == "site-a" and policy.supernode.superlink == "fl.example.org:8000"
    assert policy.supernode.private_key == "/etc/fedistill/site.key" and policy.data_path is None
    assert policy.app_sha256 == [deployment.app_hash(ROOT)] and policy.task_sources == ["digits"]
    assert policy.teacher_sha256 and policy.public_sha256 and policy.metrics_host == "127.0.0.1"
    unit = configparser.ConfigParser(interpolation=None)
    unit.read_string((kit / "fedistill-site.service").read_text())
    assert unit["Service"]["ExecStart"] == "/opt/fedistill/bin/fedistill site --config /etc/fedistill/site.yaml"
    compose = yaml.safe_load((kit / "compose.yaml").read_text())
    schema = get_builtin_schema("vendor.compose-spec")
    assert not list(jsonschema.validators.validator_for(schema)(schema).iter_errors(compose))
    assert "./site.key:/etc/fedistill/site.key:ro" in compose["services"]["site"]["volumes"]
    readme = (kit / "README.md").read_text()
    assert "fedistill site-check --config /etc/fedistill/site.yaml --task digits" in readme
    assert "site-b" not in " ".join(p.read_text() for p in kit.iterdir() if p.name != "site.key")
    again = parsed("kit", "site-a", "--coordinator", "fl.example.org:8000", "--app", str(ROOT))
    with pytest.raises(ValueError, match="already exists"):
        again.handler(again)
    missing = parsed("kit", "site-z", "--coordinator", "fl.example.org:8000", "--app", str(ROOT))
    with pytest.raises(ValueError, match=r"site-z.key does not exist: make it with `fedistill certs --out certs "
                                          r"--site site-z` first"):
        missing.handler(missing)


def test_a_kits_systemd_unit_passes_systemds_own_check(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze on this machine (Debian: the systemd package)")
    monkeypatch.chdir(tmp_path)
    make_deployment(Path("certs"), sites=["site-a"])
    venv = Path(sys.executable).parent.parent  # this environment, which has the `fedistill` command
    args = parsed("kit", "site-a", "--coordinator", "fl.example.org:8000", "--app", str(ROOT), "--venv", str(venv))
    assert args.handler(args) == 0
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "kits" / "site-a" / "fedistill-site.service")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_status_shows_each_registered_site_by_name_with_its_last_round_and_refusals(tmp_path):
    from fedistill.site_admin import format_status, last_run

    run = tmp_path / "runs" / "2026-12-04_10-00-00_run-7"
    run.mkdir(parents=True)
    records = [{"round": 1, "trained": ["site-a", "site-b"], "problems": []},
               {"round": 2, "trained": ["site-b"], "problems": [{"site": "site-a", "status": "refused", "code": "app"}]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    seen = last_run(tmp_path / "runs")
    assert seen[0] == "2026-12-04_10-00-00_run-7 (running)"  # no summary.json yet
    nodes = {11: {"status": "online"}, 22: {"status": "offline"}, 33: {"status": "online"}, 44: {"status": "unregistered"}}
    table = format_status({11: "site-a", 22: "site-b", 55: "site-c"}, nodes, seen).splitlines()
    assert table[1].split() == ["site-a", "11", "online", "1", "1", "round", "2", "(app)"]
    assert table[2].split() == ["site-b", "22", "offline", "2", "2", "-"]
    assert table[3].split()[:3] == ["site-c", "55", "unknown"] and table[3].split()[-3:] == ["-", "-", "-"]
    assert table[-1] == "nodes registered without `fedistill register` (no name): 33"  # 44 is gone
