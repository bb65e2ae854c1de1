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
    with pytest.raises(ValueError, match=r"is not a Flower app's folder .* give that folder \(--app DIR\)"):
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
    refused = ("Failed to initialize the connection to the SuperLink.\n[code: 2004] Attempted to register SuperNode "
               "with public key: b'...', exception: No SuperNode found with the given public key.")
    assert "the coordinator does not know this site's key" in deployment.supernode_exit_cause(refused)
    assert "`fedistill register`" in deployment.supernode_exit_cause(refused)
    other = "INFO : starting\nERROR : Connection refused\nINFO : bye"
    assert deployment.supernode_exit_cause(other) == "ERROR : Connection refused"
