"""A curious coordinator against two real sites: every way it tried to learn about a site's records,
files or environment before a DP release, over Flower's deployment engine on 127.0.0.1 (TLS,
registered keys, `fedistill site` started from site files), no longer works.

The coordinator ships tests/curious_server.py as its ServerApp; the sites run the real ClientApp.
Site-a holds 500 records and site-b 4,000: whatever a site answers before its DP release must not
depend on them, so the two must answer every probe alike, and no later than the bound their
files set.
"""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from common import payload as P
from common.privacy import LEDGER_FILE
from common.request import RequestError
from fedistill.loopback import APP_DIR, LoopbackDeployment, command_env

pytestmark = pytest.mark.e2e

SECRET = "s3cr3t-value-only-the-site-knows"
RECORDS = {"site-a": 500, "site-b": 4000}
HOLD_S = 2.0  # reply_after_s of both sites
REFUSED = {  # probe -> (code, reason or None for any)
    "interpolated-source": (P.REFUSAL_BAD_REQUEST, RequestError.REASON),
    "config-group-path": (P.REFUSAL_BAD_REQUEST, RequestError.REASON),
    "task-name-with-a-path": (P.REFUSAL_BAD_REQUEST, RequestError.REASON),
    "hydra-override-string": (P.REFUSAL_BAD_REQUEST, RequestError.REASON),
    "record-paths-and-settings": (P.REFUSAL_BAD_REQUEST, RequestError.REASON),
    "wrong-teacher": (P.REFUSAL_TEACHER, None),
}


def site_records(root: Path, name: str) -> Path:
    """`RECORDS[name]` digits (repeated with noise where the 1,797 run out), as a site's .npz."""
    digits = load_digits()
    rng = np.random.default_rng(len(name) + RECORDS[name])
    take = rng.choice(len(digits.target), RECORDS[name])
    images = np.clip(digits.images[take] / 16 + rng.normal(0, 0.02, (RECORDS[name], 8, 8)), 0, 1)
    path = root / "private" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images.astype(np.float32), labels=digits.target[take])
    return path


def curious_app(root: Path) -> Path:
    """This app with the curious ServerApp in place of the honest one; the ClientApp unchanged."""
    app = root / "curious-app"
    for part in ("common", "server", "client", "conf"):
        shutil.copytree(APP_DIR / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("curious_server.py"), app / "curious_server.py")
    pyproject = (APP_DIR / "pyproject.toml").read_text().replace('"server.app:app"', '"curious_server:app"')
    (app / "pyproject.toml").write_text(pyproject.replace('"client/**/*.py",', '"client/**/*.py", "curious_server.py",'))
    return app


@pytest.fixture(scope="module")
def curious(tmp_path_factory, cache_dir):
    """The probes' replies, and the deployment (its sites' files and folders) after the run."""
    root = tmp_path_factory.mktemp("curious")
    sites = {name: {"cache_dir": cache_dir, "task_sources": ["digits"], "data_path": str(site_records(root, name)),
                    "allow_unpinned_apps": True, "reply_after_s": HOLD_S} for name in RECORDS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SITE_SECRET", SECRET)  # in every site's environment (and, harmlessly, the coordinator's)
        with LoopbackDeployment(root / "deployment", sites) as deployment:
            done = deployment.submit("task=digits", app=curious_app(root))
            assert done.returncode == 0, done.stdout + done.stderr
            [out] = (deployment.root / "coordinator" / "runs").glob("curious-*.json")
            metrics = {name: scrape(port) for name, port in deployment.metrics_ports.items()}
            yield json.loads(out.read_text()), deployment, metrics, Path(cache_dir)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def by_site(replies: list[dict]) -> dict[str, list[dict]]:
    sites: dict[str, list[dict]] = {}
    for reply in replies:
        assert "error" not in reply, reply
        sites.setdefault(reply["config"][P.CONFIG][P.SITE], []).append(reply)
    return sites


def seen(reply: dict) -> dict:
    """What a reply tells the coordinator besides the site's name, its DP release and its timing."""
    config = {k: v for k, v in reply["config"][P.CONFIG].items() if k != P.SITE}
    return {"config": config, "metrics": reply["metrics"], "arrays": reply["arrays"]}


def test_every_probe_is_answered_alike_by_sites_whose_records_differ(curious):
    record, *_ = curious
    assert record["nodes"] == 2
    for name, replies in record["probes"].items():
        sites = by_site(replies)
        assert sorted(sites) == sorted(RECORDS), name
        a, b = ([seen(r) for r in sorted(sites[s], key=lambda r: r["config"][P.CONFIG][P.STATUS])] for s in RECORDS)
        assert a == b, f"{name}: site-a {a} but site-b {b}"


@pytest.mark.parametrize("probe", sorted(REFUSED))
def test_each_probe_is_refused_with_its_code_and_a_reason_that_repeats_nothing(curious, probe):
    record, *_ = curious
    for reply in record["probes"][probe]:
        status = reply["config"][P.CONFIG]
        code, reason = REFUSED[probe]
        assert (status[P.STATUS], status[P.CODE]) == (P.STATUS_REFUSED, code), status
        assert reason is None or status[P.REASON] == reason, status[P.REASON]
        assert not reply["arrays"]


def test_nothing_from_a_sites_environment_or_files_reaches_the_coordinator(curious):
    record, deployment, *_ = curious
    text = json.dumps(record)
    assert SECRET not in text
    for secret in (str(deployment.root), "/etc/passwd", "root:", "private/site-"):
        assert secret not in text, secret


def test_a_task_name_with_a_path_writes_nothing_outside_the_cache(curious):
    *_, cache = curious
    assert not (cache.parent / "outside").exists()
    assert not list(cache.rglob("*outside*"))


def test_the_sites_train_the_honest_rounds_once_each(curious):
    record, *_ = curious
    for name in RECORDS:
        [first] = by_site(record["probes"]["train-round-1"])[name]
        assert first["config"][P.CONFIG][P.STATUS] == P.STATUS_OK and first["arrays"][P.ARRAYS]
        twice = by_site(record["probes"]["round-2-twice-at-once"])[name]
        statuses = sorted(r["config"][P.CONFIG][P.STATUS] for r in twice)
        assert statuses == [P.STATUS_OK, P.STATUS_REFUSED], twice  # one request trained round 2, not both
        refused = next(r for r in twice if r["config"][P.CONFIG][P.STATUS] == P.STATUS_REFUSED)
        assert refused["config"][P.CONFIG][P.REASON] == "round 2 of this run was already trained"


def test_every_reply_is_held_until_the_sites_bound_whatever_its_record_count(curious):
    record, *_ = curious
    for name, replies in record["probes"].items():
        for reply in replies:
            assert reply["seconds"] >= HOLD_S, (name, reply["seconds"])


def test_a_reply_says_nothing_of_time_and_the_sites_metrics_stay_on_its_loopback(curious):
    record, deployment, metrics, _ = curious
    for replies in record["probes"].values():
        for reply in replies:
            assert not {k for k in reply["metrics"].get(P.METRICS, {}) if "second" in k or "time" in k}
    for name, text in metrics.items():
        assert "fedistill_site_epsilon_spent" in text and "seconds" not in text, name
    outside = [address for address in _own_addresses() if not address.startswith("127.")]
    if not outside:
        pytest.skip("this machine has no address but loopback to try the metrics port from")
    for port in deployment.metrics_ports.values():
        with socket.socket() as probe:
            probe.settimeout(2)
            assert probe.connect_ex((outside[0], port)) != 0, f"metrics answer on {outside[0]}:{port}"


def _own_addresses() -> list[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            return [probe.getsockname()[0]]
        except OSError:
            return []


def test_the_ledger_and_activity_log_are_the_sites_alone(curious):
    _, deployment, *_ = curious
    for name in RECORDS:
        folder = deployment.root / "ledgers" / name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for file in (LEDGER_FILE, "activity.jsonl"):
            assert stat.S_IMODE((folder / file).stat().st_mode) == 0o600, file


def _fedistill_site(site_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedistill.cli", "site", "--config", str(site_file)],
                          env=command_env(), capture_output=True, text=True, timeout=300)


def test_fedistill_site_refuses_to_start_when_no_app_is_pinned(tmp_path):
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump({"name": "site-a", "ledger_dir": str(tmp_path / "ledgers"),
                                         "supernode": {"insecure": True}}))
    done = _fedistill_site(site_file)
    assert done.returncode == 2 and "pins no app" in done.stderr and "allow_unpinned_apps: true" in done.stderr
    assert not (tmp_path / "ledgers").exists()  # nothing started


def test_a_site_whose_records_do_not_load_does_not_start(tmp_path, tiny_text_teacher, text_data, cache_dir):
    """A text site whose file holds a record labelled `rare`, outside the task's classes: before, a
    request made it load and fail only after the teacher check; now it cannot join at all."""
    own = tmp_path / "own.tsv"
    own.write_text("election minister treaty\tWorld\nchip robot browser\trare\n")
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump({
        "name": "site-t", "ledger_dir": str(tmp_path / "ledgers"), "cache_dir": cache_dir, "data_path": str(own),
        "task_sources": ["text"], "teacher_path": str(tiny_text_teacher), "allow_unpinned_apps": True,
        "task": {"data": {"path": str(text_data), "max_length": 16}, "split": {"public": 0.1}},
        "supernode": {"insecure": True}}))
    done = _fedistill_site(site_file)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "do not load for task text" in done.stderr and "rare" in done.stderr
    assert "connecting to" not in done.stdout
