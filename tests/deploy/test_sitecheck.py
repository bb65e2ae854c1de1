"""`fedistill site-check`: a healthy site passes; each broken part fails with its fix.

The coordinator here is a TLS stand-in; joining a real SuperLink with the site's key (registered or
not) is checked in tests/deploy/test_deployment.py.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.config import load_config
from common.payload import public_manifest
from common.privacy import Budget, PrivacyLedger, file_records
from common.tasks import build_task
from fedistill import cli
from fedistill import connection_check
from fedistill import sitecheck as S

TASK = "digits"


# -- certificates, a coordinator stand-in, records ------------------------------------


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, *, ca: bool, ips=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ips:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A deployment's CA, the coordinator's certificate for 127.0.0.1 and a site's P-384 OpenSSH key (0600)."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("fedistill test CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate("coordinator", server_key, ca.subject, ca_key, ca=False, ips=["127.0.0.1"])
    site_key = ec.generate_private_key(ec.SECP384R1())
    paths = {"ca": folder / "ca.crt", "server": folder / "server.pem", "server_key": folder / "server.key",
             "site_key": folder / "site-a.key"}
    paths["ca"].write_bytes(_pem(ca))
    paths["server"].write_bytes(_pem(server))
    paths["server_key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    paths["site_key"].write_bytes(site_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                         serialization.NoEncryption()))
    paths["site_key"].chmod(0o600)
    return paths


@contextlib.contextmanager
def serving(handle) -> Iterator[str]:
    """A server on a free loopback port that hands each connection to `handle`: yields 127.0.0.1:PORT."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection, contextlib.suppress(ssl.SSLError, OSError):
                handle(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.fixture(scope="module")
def coordinator(pki) -> str:
    """A TLS server with the coordinator's certificate: the handshake is all a site check does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server"], pki["server_key"])

    def handshake(connection: socket.socket) -> None:
        with context.wrap_socket(connection, server_side=True):
            pass

    with serving(handshake) as address:
        yield address


@pytest.fixture(scope="module")
def plain_coordinator() -> str:
    """A plain-text TCP server."""
    with serving(lambda connection: None) as address:  # closed at once
        yield address


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The stand-in speaks TLS but not Flower: the join with the site's key is taken as admitted."""
    monkeypatch.setattr(connection_check, "check_registration",
                        lambda policy: S.Check("registration", S.OK, "admitted by the stand-in"))


@pytest.fixture
def closed_port() -> str:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """300 of scikit-learn's 8x8 digits as a site's .npz."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("records") / "records.npz"
    np.savez(path, images=(digits.images[:300] / 16.0).astype(np.float32), labels=digits.target[:300])
    return path


@pytest.fixture
def digests(cache_dir) -> dict[str, str]:
    task = build_task(load_config([f"task={TASK}", f"cache_dir={cache_dir}"]))
    return {"teacher": task.teacher_digest(), "public": str(public_manifest(task.public_inputs())["public-sha256"])}


@pytest.fixture
def site(tmp_path, write_policy, pki, coordinator, records, digests):
    """site(**changes) -> the site file of a healthy site, with `changes` on top (supernode.* as a dict)."""

    def write(**changes) -> Path:
        supernode = {"superlink": coordinator, "root_certificates": str(pki["ca"]),
                     "private_key": str(pki["site_key"]), "insecure": False, **changes.pop("supernode", {})}
        values = {"name": "site-a", "ledger_dir": str(tmp_path / "ledgers"), "data_path": str(records),
                  "teacher_sha256": digests["teacher"], "public_sha256": digests["public"], "task_sources": [TASK],
                  "app_sha256": ["a" * 64], "metrics_port": 9401, "reply_after_s": 30, "supernode": supernode,
                  **changes}
        return write_policy(tmp_path / "site.yaml", **values)

    return write


@pytest.fixture
def site_ledger(tmp_path, records, cache_dir):
    """site_ledger(budget): site-a's ledger for `records`, keyed as a deployed site keys it (client/app.py)."""

    def open_ledger(budget: Budget) -> PrivacyLedger:
        data = build_task(load_config([f"task={TASK}", f"cache_dir={cache_dir}"])).load_private(records)
        return PrivacyLedger(tmp_path / "ledgers" / "site-a", budget=budget, data=file_records(data))

    return open_ledger


def command(site_file: Path) -> int:
    """`fedistill site-check --config FILE --task digits` through the command's own parser."""
    args = cli.parser().parse_args(["site-check", "--config", str(site_file), "--task", TASK])
    return args.handler(args)


def by_name(checks: list[S.Check]) -> dict[str, S.Check]:
    return {c.name: c for c in checks}


def failed(checks: list[S.Check]) -> dict[str, S.Check]:
    return {c.name: c for c in checks if c.status == S.FAIL}


# -- a healthy site -------------------------------------------------------------------


def test_a_healthy_site_is_ready(site, capsys):
    assert command(site()) == 0
    report = capsys.readouterr().out
    lines = [line for line in report.splitlines() if line and not line.startswith(" ")]
    assert all(line.startswith("ok ") for line in lines[:-1]), report
    assert "0 failed, 0 warning(s): ready to join" in report
    assert "300 records, 10 classes (0-9)" in report
    assert "verified against" in report


def test_unpinned_and_insecure_settings_are_warnings(site, digests, plain_coordinator):
    checks = by_name(S.check_site(site(teacher_sha256=None, public_sha256=None, app_sha256=[], metrics_port=None,
                                       allow_unpinned_apps=True, reply_after_s=0,
                                       supernode={"insecure": True, "superlink": plain_coordinator}), TASK))
    assert not failed(list(checks.values()))
    warned = {name for name, c in checks.items() if c.status == S.WARN}
    assert warned == {"teacher", "public set", "app", "metrics", "supernode", "certificates", "timing"}
    assert checks["teacher"].detail == f"not pinned: pin with teacher_sha256: {digests['teacher']}"
    assert "app_sha256" in checks["app"].detail
    assert checks["supernode"].detail == "insecure: plain text, no node authentication"
    assert checks["coordinator"].status == S.OK


def test_an_insecure_site_file_against_a_tls_coordinator_fails(site):
    check = failed(S.check_site(site(supernode={"insecure": True}), TASK))["coordinator"]
    assert "serves TLS, but the site file says supernode.insecure: true" in check.detail
    assert "supernode.insecure: false" in check.fix


def test_the_coordinator_certificate_expiring_within_30_days_warns(site, monkeypatch):
    monkeypatch.setattr(connection_check, "EXPIRY_WARNING", datetime.timedelta(days=400))  # the stand-in's: 365 days
    check = by_name(S.check_site(site(), TASK))["coordinator"]
    assert check.status == S.WARN and "expires within 400 days" in check.detail
    assert "fedistill certs --renew-server" in check.fix


def test_a_ledger_with_spending_reports_what_is_left(site, site_ledger):
    ledger = site_ledger(Budget(3.0, 1e-5))
    ledger.reserve(limit=Budget(3.0, 1e-5), noise_multiplier=1.0, sample_rate=0.05, steps=20, run="r1", round=1)
    spent = ledger.epsilon_spent(1e-5)
    check = by_name(S.check_site(site(), TASK))["ledger"]
    assert check.status == S.OK
    assert f"epsilon {spent:.4g} spent, {3.0 - spent:.4g} left of 3" in check.detail


# -- each broken part fails with its fix ----------------------------------------------


def test_an_invalid_site_file_is_the_only_line(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("epsilon: -1\n")
    checks = S.check_site(path, TASK)
    assert [(c.name, c.status) for c in checks] == [("site file", S.FAIL)]
    assert "site.epsilon must be a finite number > 0" in checks[0].detail


def test_a_broken_certificate_fails(site, pki, tmp_path):
    broken = tmp_path / "ca.crt"
    broken.write_bytes(pki["ca"].read_bytes()[:200])  # truncated
    checks = S.check_site(site(supernode={"root_certificates": str(broken)}), TASK)
    assert set(failed(checks)) == {"CA certificate"}
    check = failed(checks)["CA certificate"]
    assert "is not a PEM X.509 certificate" in check.detail
    assert "copy ca.crt again from the coordinator's `fedistill certs` output" in check.fix
    assert by_name(checks)["coordinator"].status == S.WARN  # answers; TLS not checked


def test_a_server_certificate_given_as_ca_fails(site, pki):
    check = failed(S.check_site(site(supernode={"root_certificates": str(pki["server"])}), TASK))["CA certificate"]
    assert "is not a CA certificate" in check.detail


def test_a_coordinator_signed_by_another_ca_fails(site, tmp_path):
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = tmp_path / "other-ca.crt"
    other.write_bytes(_pem(_certificate("another CA", other_key, None, other_key, ca=True)))
    check = failed(S.check_site(site(supernode={"root_certificates": str(other)}), TASK))["coordinator"]
    assert "does not verify against" in check.detail
    assert "signed by this CA" in check.fix


def test_a_missing_data_folder_fails(site, tmp_path):
    missing = tmp_path / "gone" / "records.npz"
    checks = S.check_site(site(data_path=str(missing)), TASK)
    assert set(failed(checks)) == {"data"}
    check = failed(checks)["data"]
    assert str(missing) in check.detail and f"nor does its folder {missing.parent}" in check.detail
    assert f"put the site's records at {missing}" in check.fix and "data_path must be" in check.fix


def test_malformed_records_fail(site, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((5, 28, 28), np.float32), labels=np.zeros(5, np.int64))  # mnist's size, not digits'
    check = failed(S.check_site(site(data_path=str(path)), TASK))["data"]
    assert "images have shape [5, 1, 28, 28]" in check.detail
    assert check.fix.startswith("data_path must be")


def test_a_teacher_other_than_the_pinned_one_fails(site):
    check = failed(S.check_site(site(teacher_sha256="b" * 64), TASK))["teacher"]
    assert "but teacher_sha256 pins " + "b" * 64 in check.detail
    assert "from the coordinator" in check.fix


def test_a_corrupt_ledger_fails_and_is_left_as_it_is(site, tmp_path):
    ledger = tmp_path / "ledgers" / "site-a" / "ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"format": "fedistill-privacy-ledger", "entr')
    checks = S.check_site(site(), TASK)
    assert set(failed(checks)) == {"ledger"}
    check = failed(checks)["ledger"]
    assert "unreadable or corrupt" in check.detail
    assert "restore it from your backup" in check.fix and "Never delete" in check.fix
    assert ledger.read_text() == '{"format": "fedistill-privacy-ledger", "entr'
    assert sorted(p.name for p in ledger.parent.iterdir()) == ["ledger.json"]


def test_a_ledger_kept_under_another_budget_fails(site, site_ledger):
    budget = Budget(1.0, 1e-5)
    site_ledger(budget).reserve(limit=budget, noise_multiplier=2.0, sample_rate=0.05, steps=10, run="r", round=1)
    check = failed(S.check_site(site(), TASK))["ledger"]
    assert "set site.epsilon=1.0" in check.detail


def test_a_key_readable_by_others_fails(site, pki, tmp_path):
    key = tmp_path / "site-a.key"
    key.write_bytes(pki["site_key"].read_bytes())
    key.chmod(0o644)
    checks = S.check_site(site(supernode={"private_key": str(key)}), TASK)
    assert set(failed(checks)) == {"site key"}
    check = failed(checks)["site key"]
    assert "mode 644" in check.detail
    assert check.fix == f"chmod 600 {key}"


def test_a_key_readable_by_its_group_only_warns(site, pki, tmp_path):
    key = tmp_path / "site-a.key"
    key.write_bytes(pki["site_key"].read_bytes())
    key.chmod(0o440)  # as Kubernetes mounts a Secret with fsGroup
    [check] = [c for c in S.check_site(site(supernode={"private_key": str(key)}), TASK) if c.name == "site key"]
    assert check.status == S.WARN and "mode 440" in check.detail and "chmod 600" in check.fix


def test_a_key_that_is_not_an_openssh_ec_key_fails(site, pki, tmp_path):
    key = tmp_path / "site-a.key"
    key.write_bytes(pki["server_key"].read_bytes())  # PKCS#8, not OpenSSH
    key.chmod(0o600)
    check = failed(S.check_site(site(supernode={"private_key": str(key)}), TASK))["site key"]
    assert "is not an unencrypted OpenSSH private key" in check.detail


def test_a_coordinator_that_does_not_answer_fails(site, closed_port, capsys):
    site_file = site(supernode={"superlink": closed_port})
    assert command(site_file) == 1
    report = capsys.readouterr().out
    checks = failed(S.check_site(site_file, TASK))
    assert set(checks) == {"coordinator"}
    check = checks["coordinator"]
    assert f"{closed_port} does not answer" in check.detail
    assert "firewall" in check.fix and "outbound TCP" in check.fix and "`fedistill coordinator`" in check.fix
    assert "FAIL  coordinator" in report and "fix: check supernode.superlink" in report
    assert report.rstrip().endswith("1 failed, 1 warning(s): not ready")  # the join is not tried


def test_the_report_reads_line_by_line():
    report = S.format_report([S.Check("data", S.OK, "300 records"), S.Check("site key", S.FAIL, "mode 644", "chmod 600 k")])
    assert report.splitlines() == ["ok    data      300 records", "FAIL  site key  mode 644",
                                   "                fix: chmod 600 k", "", "1 failed, 0 warning(s): not ready"]


def test_a_site_that_pins_no_app_fails_unless_its_file_allows_it(site):
    check = failed(S.check_site(site(app_sha256=[]), TASK))["app"]
    assert "no app pinned" in check.detail and "allow_unpinned_apps: true" in check.fix


def test_metrics_served_beyond_loopback_are_a_warning(site):
    check = by_name(S.check_site(site(metrics_host="0.0.0.0"), TASK))["metrics"]
    assert check.status == S.WARN and "no authentication" in check.detail


def test_a_delta_at_or_above_one_over_the_records_fails_the_data_check(site):
    check = failed(S.check_site(site(delta=0.01), TASK))["data"]  # 300 records: 1/N = 0.0033
    assert "site.delta 0.01 is not below 1/N for the site's 300 records" in check.detail


def test_records_released_without_dp_fail(site, site_ledger):
    site_ledger(Budget(3.0, 1e-5)).admit_round(run="r", round=1, most_rounds=1, sample_rate=0.05, steps=10, limit=None)
    check = failed(S.check_site(site(), TASK))["ledger"]
    assert "released without DP: the site will refuse every DP run" in check.detail
    assert "cannot be raised" in check.fix


def test_a_task_the_site_does_not_allow_fails_before_its_code_is_imported(site, monkeypatch):
    built = []
    monkeypatch.setattr(S, "build_task", built.append)
    checks = S.check_site(site(), "partner_tasks.image:build")
    check = failed(checks)["task"]
    assert "task 'partner_tasks.image:build' is not in task_sources" in check.detail
    assert "add partner_tasks.image:build to task_sources" in check.fix
    assert built == []
    assert by_name(checks)["data"].status == S.WARN  # not checked without a task
