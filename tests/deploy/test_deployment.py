"""A real deployment on 127.0.0.1, started with fedistill's own commands: a coordinator (SuperLink
with TLS and node authentication), two registered sites (SuperNodes) with their own data,
site files and ledgers, runs submitted with `fedistill submit`, and Prometheus scraping both sides.

Every process is a child in its own session, stopped by PID when the module's tests end,
also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from common.privacy import LEDGER_FILE, Budget, PrivacyLedger
from fedistill import deployment as D
from fedistill.loopback import APP_DIR, LoopbackDeployment, command_env, fedistill
from fedistill.processes import Child, free_port
from server.rounds import APP_REFUSED

pytestmark = pytest.mark.e2e  # real SuperLink and SuperNode processes

ROOT = APP_DIR
SITES = ("site-a", "site-b")
RUN = ["task=digits", "rounds=2", "federation.min_sites=2", "distill.local_epochs=1"]


def site_records(root: Path, name: str, index: int, *, mirrored: bool = False) -> Path:
    """Site `name`'s records: half of scikit-learn's digits (mirrored left to right: records of their own)."""
    digits = load_digits()
    half = slice(index, None, 2)
    images = digits.images[half][:, :, ::-1] if mirrored else digits.images[half]
    path = root / "records" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=(images / 16).astype(np.float32), labels=digits.target[half])
    return path


def one_more_epsilon(deployment: LoopbackDeployment) -> str:
    """A run's request that lets each site spend about 1 more epsilon of its 8: a run's
    privacy.epsilon caps what a site's ledger may hold after it, across runs."""
    spent = [PrivacyLedger.inspect(deployment.root / "ledgers" / name, budget=Budget(8.0, 1e-5)).epsilon_spent()
             for name in SITES if ledger(deployment, name)]
    return f"privacy.epsilon={max(spent, default=0.0) + 1:.3f}"


def ledger(deployment: LoopbackDeployment, name: str) -> dict | None:
    path = deployment.root / "ledgers" / name / LEDGER_FILE
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("deployment")
    pinned = [D.app_hash(ROOT)]  # site-a runs only this app; site-b any
    sites = {name: {"epsilon": 8.0, "delta": 1e-5, "cache_dir": cache_dir, "task_sources": ["digits"],
                    "data_path": str(site_records(root, name, index)), "reply_after_s": 0,
                    "app_sha256": pinned if name == "site-a" else [], "allow_unpinned_apps": name == "site-b"}
             for index, name in enumerate(SITES)}
    with LoopbackDeployment(root, sites) as deployment:
        yield deployment


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


@dataclass
class FirstRun:
    """The module's first run, submitted while a real Prometheus scrapes both sides (where it is installed)."""

    output: str
    run: Path
    server_metrics: str  # the coordinator's endpoint once round 1 was complete
    prometheus: dict[str, list] | None  # Prometheus's answers, None without the binary


@pytest.fixture(scope="module")
def first_run(deployed, tmp_path_factory) -> FirstRun:
    """One Prometheus plays the coordinator's (deploy/prometheus.yml) and site-b's own (site-prometheus.yml)."""
    folder = tmp_path_factory.mktemp("prometheus")
    server_port, prometheus_port = free_port(), free_port()
    binary = shutil.which("prometheus")
    with contextlib.ExitStack() as stack:
        if binary is not None:
            config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
            config["global"]["scrape_interval"] = "1s"
            config["scrape_configs"] += yaml.safe_load((ROOT / "deploy" / "site-prometheus.yml").read_text())["scrape_configs"]
            targets = {"fedistill-coordinator": [f"127.0.0.1:{server_port}"],
                       "fedistill-site": [f"127.0.0.1:{deployed.metrics_ports['site-b']}"]}
            for job in config["scrape_configs"]:
                job["scrape_interval"] = "1s"
                job["static_configs"][0]["targets"] = targets[job["job_name"]]
            (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
            command = [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                       f"--web.listen-address=127.0.0.1:{prometheus_port}"]
            stack.enter_context(Child(command, env=dict(os.environ), log=folder / "prometheus.log", port=prometheus_port))
        with subprocess.Popen(deployed.submit_command(*RUN, one_more_epsilon(deployed), f"federation.metrics_port={server_port}"),
                              env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) as submitted:
            try:
                server_metrics = wait_for_round(server_port, submitted)
                output, _ = submitted.communicate(timeout=600)
            finally:
                if submitted.poll() is None:
                    submitted.kill()
        assert submitted.returncode == 0, output
        answers = None if binary is None else {
            "epsilon": query(prometheus_port, 'fedistill_site_epsilon_spent{site="site-b"}', until=lambda r: r),
            "rounds": query(prometheus_port, "max_over_time(fedistill_server_rounds_completed_total[10m])",
                            until=lambda r: r)}
    return FirstRun(output, deployed.runs()[-1], server_metrics, answers)


def test_a_two_site_tls_federation_runs_to_completion_and_each_site_keeps_its_ledger(deployed, first_run):
    run = first_run.run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert {s["site"]: s["rounds_trained"] for s in summary["privacy"]["sites"]} == {"site-a": 2, "site-b": 2}
    assert (run / "metrics.jsonl").read_text().count("\n") == 2
    assert "run directory" in first_run.output and str(run) in first_run.output
    for name in SITES:  # each site's own disk, outside the run directory, holds its two rounds
        kept = ledger(deployed, name)
        this_run = [e for e in kept["entries"] if e["run"] == run.name.rsplit("_run-", 1)[1]]
        assert [e["round"] for e in this_run] == [1, 2] and all(e["dp"] for e in this_run)
        assert kept["budget"] == 8.0
        metrics = scrape(deployed.metrics_ports[name])
        assert f'fedistill_site_rounds_trained_total{{site="{name}"}} 2.0' in metrics
        spent = float(metrics.split(f'fedistill_site_epsilon_spent{{site="{name}"}} ')[1].split()[0])
        assert 0 < spent <= 8.0


def test_prometheus_scrapes_the_coordinator_and_a_site_with_the_deploy_scrape_configurations(first_run):
    for name in ("fedistill_server_rounds_completed_total", "fedistill_server_replies_received_total",
                 'fedistill_server_bytes_total{direction="up"}', "fedistill_server_aggregation_seconds_bucket",
                 'fedistill_server_site_epsilon{site="site-a"}', 'fedistill_server_student_metric{metric="accuracy"}'):
        assert name in first_run.server_metrics
    if first_run.prometheus is None:
        pytest.skip("no `prometheus` binary (Debian: apt-get install prometheus); .ci/run installs it")
    assert 0 < float(first_run.prometheus["epsilon"][0]["value"][1]) <= 8.0
    assert float(first_run.prometheus["rounds"][0]["value"][1]) >= 1


def test_a_site_refuses_a_run_asking_for_more_epsilon_or_a_larger_delta_than_its_policy(deployed):
    before = {name: ledger(deployed, name) for name in SITES}
    done = deployed.submit(*RUN, "rounds=1", "privacy.epsilon=9", "privacy.delta=1e-4")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((deployed.runs()[-1] / "summary.json").read_text())
    refusals = {s["site"]: s["refusals"] for s in summary["privacy"]["sites"]}
    assert set(refusals) == set(SITES)
    for name in SITES:
        [refusal] = refusals[name]
        assert "privacy.epsilon exceeds the site's budget 8" in refusal["reason"]
        assert "privacy.delta exceeds the site's delta 1e-05" in refusal["reason"]
        assert ledger(deployed, name) == before[name]  # nothing spent
        assert 'fedistill_site_refusals_total{code="policy",site="' + name + '"} 1.0' in scrape(deployed.metrics_ports[name])


@pytest.fixture(scope="module")
def changed_app(tmp_path_factory) -> Path:
    """A release of the app with one change the sites have not vetted."""
    changed = tmp_path_factory.mktemp("release") / "app"
    shutil.copytree(ROOT, changed, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "__pycache__", "bench",
                                                                 "tests", "deploy", "docs"))
    with open(changed / "client" / "app.py", "a") as app:
        app.write("\n# a change the site has not vetted\n")
    return changed


def status(deployed: LoopbackDeployment) -> dict[str, list[str]]:
    """The rows, by site name, of the `fedistill status` command the coordinator printed when it started, run
    as printed."""
    printed = (deployed.root / "coordinator.out").read_text().splitlines()
    [*_, command] = [line.strip() for line in printed if line.strip().startswith("fedistill status ")]
    done = fedistill(*shlex.split(command)[1:], cwd=deployed.root)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = done.stdout.splitlines()[1:]
    return {line.split()[0]: line.split() for line in rows if not line.startswith(("last run", "no run", "nodes "))}


def test_a_site_that_pins_the_app_refuses_a_changed_one_and_every_report_names_it(deployed, changed_app):
    before = ledger(deployed, "site-a")
    done = deployed.submit(*RUN, "rounds=1", one_more_epsilon(deployed), app=changed_app)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 refused (site-a: app)" in done.stdout
    run = deployed.runs()[-1]
    [round_record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert round_record["sites_trained"] == 1  # site-b (unpinned) trained; site-a ran no code of the app
    assert round_record["problems"] == [{"site": "site-a", "status": "refused", "code": "app", "reason": APP_REFUSED}]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sites"] == 2
    [refusal] = {s["site"]: s for s in summary["privacy"]["sites"]}["site-a"]["refusals"]
    assert refusal["code"] == "app"
    assert f"- round 1, site-a (app): {APP_REFUSED}" in (run / "privacy.md").read_text()
    assert ledger(deployed, "site-a") == before
    assert 'fedistill_site_refusals_total{code="app",site="site-a"} 1.0' in scrape(deployed.metrics_ports["site-a"])
    rows = status(deployed)
    assert rows["site-a"][2] == "online" and "(app)" in " ".join(rows["site-a"]) and rows["site-b"][2] == "online"


def test_an_app_upgrade_with_both_pins_side_by_side_and_a_site_added_to_the_running_federation(deployed, changed_app):
    new = fedistill("app-hash", str(changed_app)).stdout.strip()
    assert new == D.app_hash(changed_app) and new not in deployed.policies["site-a"]["app_sha256"]
    deployed.restart_site("site-a", app_sha256=[*deployed.policies["site-a"]["app_sha256"], new])  # old and new
    # the coordinator adds site-c with the commands `fedistill certs` prints, run as shown in its folder, and
    # hands it a startup kit pinning the new release; site-c runs the kit's site file with its own records
    made = fedistill("certs", "--out", "certs", "--site", "site-c", "--port", str(deployed.port), cwd=deployed.root)
    assert made.returncode == 0, made.stderr
    [register] = [line.strip() for line in made.stdout.splitlines() if line.strip().startswith("fedistill register")]
    registered = fedistill(*shlex.split(register)[1:], cwd=deployed.root)
    assert registered.returncode == 0 and "site-c registered as node" in registered.stdout, registered.stderr
    kit = deployed.root / "kits" / "site-c"
    made = fedistill("kit", "site-c", "task=digits", f"cache_dir={deployed.policies['site-b']['cache_dir']}",
                     "--coordinator", deployed.address, "--install-dir", str(kit), "--app", str(changed_app),
                     cwd=deployed.root)
    assert made.returncode == 0, made.stderr
    site_file = yaml.safe_load((kit / "site.yaml").read_text())
    assert site_file["app_sha256"] == [new] and site_file["supernode"]["superlink"] == deployed.address
    deployed.add_site("site-c", {**site_file, "data_path": str(site_records(deployed.root, "site-c", 0, mirrored=True)),
                                 "ledger_dir": str(deployed.root / "ledgers"), "cache_dir": deployed.policies["site-b"]["cache_dir"],
                                 "reply_after_s": 0}, registered=True)
    # the round waits until all three are connected (site-c's SuperNode connects after `fedistill site` listens)
    done = deployed.submit(*RUN, "rounds=1", "federation.min_sites=3", one_more_epsilon(deployed), app=changed_app)
    assert done.returncode == 0, done.stdout + done.stderr
    run = deployed.runs()[-1]
    [round_record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert round_record["sites_trained"] == 3 and not round_record["problems"], round_record
    assert set(round_record["epsilon"]) == {"site-a", "site-b", "site-c"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sites"] == 3 and [s["site"] for s in summary["privacy"]["sites"]] == ["site-a", "site-b", "site-c"]
    assert "| site-c |" in (run / "privacy.md").read_text()
    rows = status(deployed)  # rounds trained and the last round, in this run
    assert {name: row[3:5] for name, row in rows.items()} == {name: ["1", "1"] for name in ("site-a", "site-b", "site-c")}


def test_an_unregistered_key_fails_the_preflight_and_the_site_says_why_it_stopped(deployed):
    deployed.sites["site-c"].stop()
    done = fedistill("unregister", "site-c", *deployed.link)
    assert done.returncode == 0 and "site-c" in done.stdout, done.stdout + done.stderr
    assert "site-c" not in status(deployed)
    check = fedistill("site-check", "--config", str(deployed.site_files["site-c"]), "--task", "digits")
    assert check.returncode == 1
    assert "the coordinator has not registered this site's key" in check.stdout, check.stdout
    assert "fedistill register" in check.stdout
    site = fedistill("site", "--config", str(deployed.site_files["site-c"]), "--state",
                     str(deployed.root / "site-c" / "node"), timeout=600)
    assert site.returncode != 0
    assert "the coordinator does not know this site's key" in site.stderr, site.stdout + site.stderr


def test_the_preflight_of_a_running_site_and_of_a_plain_text_site_file(deployed, tmp_path):
    check = fedistill("site-check", "--config", str(deployed.site_files["site-a"]), "--task", "digits")
    assert "the key is registered, and a SuperNode with it is online now" in check.stdout, check.stdout
    assert check.returncode == 0
    plain = yaml.safe_load(deployed.site_files["site-a"].read_text())
    plain["supernode"] = {**plain["supernode"], "insecure": True}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    check = fedistill("site-check", "--config", str(tmp_path / "plain.yaml"), "--task", "digits")
    assert check.returncode == 1
    assert "serves TLS, but the site file says supernode.insecure: true" in check.stdout, check.stdout


def test_a_plain_text_supernode_cannot_join_the_tls_coordinator(deployed):
    log = deployed.root / "plain.log"
    command = [D.console_script("flower-supernode"), "--superlink", deployed.address, "--port", str(free_port()),
               "--insecure", "--max-retries", "2", "--max-wait-time", "20"]
    assert_refused(command, deployed.root / "plain-home", log)


def assert_refused(command: list[str], flwr_home: Path, log: Path) -> None:
    """The SuperNode gives up without ever being admitted, and the coordinator lists no node for it."""
    with Child(command, env=D.flwr_env(flwr_home), log=log, flwr_home=flwr_home) as node:
        try:
            node.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the SuperNode was not refused within 120 s; its log:\n{node.log_text()}")
        assert node.process.returncode != 0, node.log_text()
        assert "Node registered" not in node.log_text() and "Heartbeat" not in node.log_text()


def wait_for_round(port: int, submitted: subprocess.Popen) -> str:
    """The coordinator's metrics once a round is complete (the endpoint lives as long as the run)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and submitted.poll() is None:
        with contextlib.suppress(OSError):
            text = scrape(port)
            if "fedistill_server_rounds_completed_total 1.0" in text:
                return text
        time.sleep(0.5)
    pytest.fail(f"the coordinator's metrics never showed a completed round; submit said:\n{submitted.stdout.read()}")


def query(port: int, expression: str, *, until, timeout: float = 30) -> list:
    """Prometheus's answer to `expression` through its HTTP API, polled until `until(result)`."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        if until(answer["data"]["result"]) or time.monotonic() > deadline:
            return answer["data"]["result"]
        time.sleep(1)


def test_a_renewed_server_certificate_is_served_after_a_restart_and_the_sites_keep_their_files(deployed):
    site_files = {p: p.read_bytes() for p in (deployed.ca, deployed.certs / "sites" / "site-a.key")}
    old = (deployed.certs / "server.crt").read_text().strip()
    done = fedistill("certs", "--out", "certs", "--renew-server", cwd=deployed.root)
    assert done.returncode == 0 and "restart the coordinator" in done.stdout, done.stderr
    deployed.restart_coordinator()
    served = ssl.get_server_certificate(("127.0.0.1", deployed.port)).strip()
    assert served == (deployed.certs / "server.crt").read_text().strip() != old
    assert all(path.read_bytes() == data for path, data in site_files.items())
    assert set(status(deployed)) == {"site-a", "site-b"}  # `flwr` verifies the new certificate with the same ca.crt
