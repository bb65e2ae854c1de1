"""`fedistill certs`: the CA, the SuperLink's TLS certificate and the sites' keys, checked as
Python's ssl and Flower use them, and once against a real `flower-superlink`."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedistill import certs
from fedistill.certs import make_deployment
from fedistill.pki import subject_alt_names

HOSTS = ["coordinator.example.org", "localhost"]
IPS = ["127.0.0.1", "10.1.2.3", "::1"]


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(kind).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def deployment(tmp_path) -> certs.Deployment:
    return make_deployment(tmp_path / "certs", hosts=HOSTS, ips=IPS, sites=["site-a", "site-b"], days=30)


# --- the certificates ----------------------------------------------------------------------


def test_server_certificate_is_signed_by_the_ca_for_exactly_the_given_names(deployment):
    ca, server = certificate(deployment.ca_cert), certificate(deployment.server_cert)
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    server.verify_directly_issued_by(ca)  # issuer name and signature together

    san = extension(server, x509.SubjectAlternativeName)
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(HOSTS)
    assert sorted(map(str, san.get_values_for_type(x509.IPAddress))) == sorted(map(str, map(ipaddress.ip_address, IPS)))
    assert len(list(san)) == len(HOSTS) + len(IPS)
    assert list(extension(server, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert extension(server, x509.BasicConstraints).ca is False
    assert (extension(server, x509.AuthorityKeyIdentifier).key_identifier
            == extension(ca, x509.SubjectKeyIdentifier).digest)

    now = datetime.datetime.now(datetime.timezone.utc)
    for cert in (ca, server):
        assert cert.not_valid_before_utc <= now
        assert abs(cert.not_valid_after_utc - (now + datetime.timedelta(days=30))) < datetime.timedelta(hours=1)
    assert deployment.server_names == tuple([f"DNS:{h}" for h in HOSTS] + [f"IP:{ipaddress.ip_address(i)}" for i in IPS])


def test_ca_may_sign_certificates_and_nothing_else(deployment):
    ca = certificate(deployment.ca_cert)
    assert extension(ca, x509.BasicConstraints).ca is True
    usage = extension(ca, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert extension(ca, x509.SubjectKeyIdentifier).digest == x509.SubjectKeyIdentifier.from_public_key(
        ca.public_key()).digest


def test_python_ssl_accepts_the_server_pair_and_trusts_only_this_ca(deployment):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(deployment.server_cert, deployment.server_key)  # what the SuperLink's uvicorn does
    client = ssl.create_default_context(cafile=str(deployment.ca_cert))
    assert len(client.get_ca_certs()) == 1


# --- the files -----------------------------------------------------------------------------


def test_private_keys_are_0600_from_creation_and_sites_folder_0700(tmp_path, monkeypatch):
    opened: dict[str, int] = {}
    chmodded: list[str] = []
    real_open, real_chmod = os.open, os.chmod

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        opened[os.fspath(path)] = mode
        return real_open(path, flags, mode, *args, **kwargs)

    def spy_chmod(path, mode, *args, **kwargs):
        chmodded.append(os.fspath(path))
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", spy_chmod)
    old_umask = os.umask(0)  # nothing may rely on the umask to hide a key
    try:
        made = make_deployment(tmp_path / "certs", hosts=["localhost"], ips=[], sites=["site-a"])
    finally:
        os.umask(old_umask)

    private = [made.ca_key, made.server_key, made.site_keys["site-a"]]
    for path in private:
        assert mode(path) == 0o600, path
        assert opened[str(path)] == 0o600, f"{path} was not created 0600"
        assert str(path) not in chmodded, f"{path} was made private only after it was written"
    for path in [made.ca_cert, made.server_cert, made.site_public_keys["site-a"]]:
        assert mode(path) == 0o644, path
    assert mode(tmp_path / "certs" / "sites") == 0o700


def test_site_keys_load_as_flower_loads_them(deployment):
    for name in ("site-a", "site-b"):
        # flower-supernode --auth-supernode-private-key: load_ssh_private_key(bytes, None)
        private = load_ssh_private_key(deployment.site_keys[name].read_bytes(), None)
        # flwr supernode register: load_ssh_public_key(file.read()), a NIST EC curve
        public = load_ssh_public_key(deployment.site_public_keys[name].read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(private.curve, ec.SECP384R1) and isinstance(public.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
    first, second = (load_ssh_public_key(deployment.site_public_keys[n].read_bytes()) for n in ("site-a", "site-b"))
    assert first.public_numbers() != second.public_numbers()


def test_existing_files_are_kept_without_overwrite(tmp_path):
    out = tmp_path / "certs"
    make_deployment(out, hosts=["localhost"], ips=["127.0.0.1"], sites=["site-a"])
    with pytest.raises(FileExistsError, match=r"ca\.crt already exists.*--overwrite.*--out"):
        make_deployment(out, hosts=["localhost"], ips=["127.0.0.1"], sites=[])
    with pytest.raises(FileExistsError, match=r"site-a\.key already exists.*--overwrite"):
        make_deployment(out, hosts=["localhost"], ips=["127.0.0.1"], sites=["site-a"])

    lone_key = tmp_path / "other" / "server.key"  # no CA here: a new deployment would replace it
    lone_key.parent.mkdir()
    lone_key.write_text("not mine")
    with pytest.raises(FileExistsError, match=rf"{lone_key}.*--overwrite.*--out"):
        make_deployment(lone_key.parent, hosts=["localhost"], ips=[], sites=[])
    assert lone_key.read_text() == "not mine"
    assert sorted(p.name for p in lone_key.parent.iterdir()) == ["server.key"]


def test_overwrite_reissues_and_leaves_replaced_keys_private(tmp_path):
    out = tmp_path / "certs"
    first = make_deployment(out, hosts=["localhost"], ips=["127.0.0.1"], sites=["site-a"])
    old_ca = first.ca_cert.read_bytes()
    os.chmod(first.server_key, 0o644)  # a copy made world-readable by hand must not stay so
    second = make_deployment(out, hosts=["localhost"], ips=["127.0.0.1"], sites=["site-a"], overwrite=True)
    assert second.ca_cert.read_bytes() != old_ca
    assert mode(second.server_key) == 0o600
    assert not [p for p in out.rglob(".*") if p.is_file()], "a temporary file was left behind"


def test_adding_a_site_reuses_the_ca(tmp_path):
    out = tmp_path / "certs"
    first = make_deployment(out, hosts=["coordinator"], ips=["127.0.0.1"], sites=["site-a"])
    before = {p: p.read_bytes() for p in (first.ca_cert, first.ca_key, first.server_cert, first.server_key,
                                          first.site_keys["site-a"])}
    first.ca_key.unlink()  # ca.key is kept offline: adding a site must not need it
    del before[first.ca_key]

    added = make_deployment(out, hosts=None, ips=None, sites=["site-b"])
    assert added.reused_ca
    assert {p: p.read_bytes() for p in before} == before  # ca.crt byte-identical, nothing else touched
    assert set(added.written) == {out / "sites" / "site-b.key", out / "sites" / "site-b.pub"}
    assert added.server_names == ("DNS:coordinator", "IP:127.0.0.1")

    with pytest.raises(ValueError, match=r"server\.crt.*--host coordinator, not elsewhere"):
        make_deployment(out, hosts=["elsewhere"], ips=None, sites=["site-c"])
    assert not (out / "sites" / "site-c.key").exists()


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "site a", "", ".hidden", "sité", "a/b"])
def test_bad_site_name_is_refused_by_name(tmp_path, name):
    with pytest.raises(ValueError, match="bad site name") as err:
        make_deployment(tmp_path / "certs", hosts=["localhost"], ips=[], sites=[name])
    assert repr(name) in str(err.value) and "letters, digits" in str(err.value)
    assert not (tmp_path / "certs").exists()  # checked before anything is written


@pytest.mark.parametrize("address", ["1.2.3", "localhost", "256.0.0.1", ""])
def test_bad_ip_is_refused_by_value(tmp_path, address):
    with pytest.raises(ValueError, match="bad IP address") as err:
        make_deployment(tmp_path / "certs", hosts=["localhost"], ips=[address], sites=[])
    assert repr(address) in str(err.value)
    assert not (tmp_path / "certs").exists()


@pytest.mark.parametrize("host, message", [("", "bad host name ''"), ("a b", "bad host name 'a b'"),
                                           ("10.0.0.1", "is an IP address: give it with --ip 10.0.0.1")])
def test_bad_host_is_refused_by_value(tmp_path, host, message):
    with pytest.raises(ValueError, match=message):
        make_deployment(tmp_path / "certs", hosts=[host], ips=[], sites=[])


def test_a_server_certificate_needs_a_name(tmp_path):
    with pytest.raises(ValueError, match="--host NAME or --ip ADDR"):
        make_deployment(tmp_path / "certs", hosts=[], ips=[], sites=[])


# --- the command ---------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedistill")
    certs.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_command_writes_and_says_who_gets_what(tmp_path, capsys):
    out = tmp_path / "certs"
    args = parse(["certs", "--out", str(out), "--site", "site-a", "--site", "site-b", "--days", "7"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "DNS:localhost, IP:127.0.0.1" in printed  # the defaults
    assert f"site-a: {out / 'ca.crt'}, {out / 'sites' / 'site-a.key'}" in printed
    assert (f"fedistill register {out / 'sites' / 'site-b.pub'} --coordinator localhost:8000 --ca {out / 'ca.crt'}"
            in printed)  # a command that works as shown against `fedistill coordinator --certs OUT`
    assert f"fedistill coordinator --certs {out}" in printed
    assert f"Keep {out / 'ca.key'} offline" in printed
    coordinator_line = next(line for line in printed.splitlines() if "To the coordinator" in line)
    assert "server.key" in coordinator_line and "ca.key" not in coordinator_line


def test_renewing_the_server_certificate_keeps_its_names_its_ca_and_every_site_file(tmp_path, capsys):
    out = tmp_path / "certs"
    make_deployment(out, hosts=["coordinator.example.org"], ips=["10.0.0.5"], sites=["site-a"], days=20)
    kept = {p: p.read_bytes() for p in (out / "ca.crt", out / "sites" / "site-a.key", out / "sites" / "site-a.pub")}
    old = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    args = parse(["certs", "--out", str(out), "--renew-server", "--days", "400"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "restart the coordinator" in printed
    new = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    new.verify_directly_issued_by(ca)
    assert subject_alt_names(new) == subject_alt_names(old) == ("DNS:coordinator.example.org", "IP:10.0.0.5")
    assert new.public_key() != old.public_key()
    assert new.not_valid_after_utc == ca.not_valid_after_utc  # 400 days asked, but never beyond its CA
    assert "capped at the CA's expiry" in printed and "--overwrite" in printed
    assert all(path.read_bytes() == data for path, data in kept.items())
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600


def test_renewing_without_the_ca_key_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "certs"
    make_deployment(out, sites=[])
    (out / "ca.key").unlink()  # kept offline
    before = (out / "server.crt").read_bytes()
    args = parse(["certs", "--out", str(out), "--renew-server"])
    assert args.handler(args) == 2
    error = capsys.readouterr().err
    assert "ca.key is missing" in error and "bring it back from where it is kept offline" in error
    assert (out / "server.crt").read_bytes() == before


def test_command_error_goes_to_stderr_with_exit_code_2(tmp_path, capsys):
    args = parse(["certs", "--out", str(tmp_path / "certs"), "--ip", "300.1.1.1"])
    assert args.handler(args) == 2
    captured = capsys.readouterr()
    assert "bad IP address '300.1.1.1'" in captured.err and not captured.out


# --- a real SuperLink ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_handshake(port: int, ca: Path, server_hostname: str) -> None:
    context = ssl.create_default_context(cafile=str(ca))  # the CA is the only trust anchor
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname):
            pass


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group it leads, then SIGKILL if it is still alive after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def superlink(tmp_path, deployment):
    """A real flower-superlink on 127.0.0.1 serving the generated TLS files; yields its port."""
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    log = tmp_path / "superlink.log"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    command = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--ssl-ca-certfile", str(deployment.ca_cert),
        "--ssl-certfile", str(deployment.server_cert),
        "--ssl-keyfile", str(deployment.server_key),
        "--enable-supernode-auth",
        "--host", "127.0.0.1", "--port", str(port),
        "--database", str(tmp_path / "superlink.db"),
        "--disable-runtime-dependency-installation",
        # No ServerApp runs here, so no SuperExec either: it would start in a session of its own.
        "--isolation", "process",
    ]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        wait_for_tls(process, port, deployment.ca_cert, log)
        yield port
    finally:
        stop_process_group(process)


def wait_for_tls(process: subprocess.Popen, port: int, ca: Path, log: Path, timeout: float = 12.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"flower-superlink exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            tls_handshake(port, ca, "localhost")
            return
        except (ConnectionRefusedError, ConnectionResetError, ssl.SSLEOFError, socket.timeout):
            if time.monotonic() > deadline:
                pytest.fail(f"flower-superlink did not answer TLS on {port} in {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


def test_real_superlink_serves_the_certificate_to_clients_trusting_only_the_ca(superlink, deployment, tmp_path):
    tls_handshake(superlink, deployment.ca_cert, "localhost")

    # A name the certificate does not hold is refused, even with the right CA.
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|not valid for"):
        tls_handshake(superlink, deployment.ca_cert, "elsewhere.example")

    # Another deployment's CA does not vouch for this server.
    other = make_deployment(tmp_path / "other", hosts=["localhost"], ips=["127.0.0.1"], sites=[])
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer|certificate verify failed"):
        tls_handshake(superlink, other.ca_cert, "localhost")
