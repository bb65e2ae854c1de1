"""`fedistill site-check`'s checks of how the site connects: the transport, the CA certificate,
the site's SuperNode key, and that the coordinator answers (over TLS with that CA)."""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.policy import SitePolicy
from fedistill.check_report import FAIL, OK, WARN, Check, message

CONNECT_TIMEOUT_S = 5.0
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
EXPIRY_WARNING = datetime.timedelta(days=30)
NODE_ACTIVATION_FAILED = 2004  # Flower's ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED
CERTS_FIX = "copy ca.crt again from the coordinator's `fedistill certs` output (the whole file)"


def check_certificates_and_coordinator(policy: SitePolicy) -> list[Check]:
    """The transport, the CA certificate and the site's key, then the coordinator: over TLS where the
    CA certificate loaded, in plain text where the site file says insecure."""
    transport = check_transport(policy)
    if policy.supernode.insecure:
        return [transport, Check("certificates", WARN, "not checked: supernode.insecure is true"),
                check_coordinator(policy, tls=False)]
    ca = check_ca_certificate(policy)
    key = check_site_key(policy)
    coordinator = check_coordinator(policy, tls=ca.status != FAIL)
    if key.status == FAIL or coordinator.status == FAIL or ca.status == FAIL:
        registration = Check("registration", WARN, "not checked: the key, CA certificate or coordinator failed (above)")
    else:
        registration = check_registration(policy)
    return [transport, ca, key, coordinator, registration]


def check_transport(policy: SitePolicy) -> Check:
    if policy.supernode.insecure:
        return Check("supernode", WARN, "insecure: plain text, no node authentication",
                     "for a real deployment set supernode.insecure: false with root_certificates and private_key "
                     "from the coordinator's `fedistill certs`")
    return Check("supernode", OK, "TLS, node authentication with the site's key")


def check_ca_certificate(policy: SitePolicy) -> Check:
    """root_certificates is a PEM X.509 CA certificate that is valid now."""
    name, setting = "CA certificate", policy.supernode.root_certificates
    if setting is None:
        return Check(name, FAIL, "supernode.root_certificates is not set",
                     "set supernode.root_certificates to ca.crt from the coordinator's `fedistill certs` output")
    path = Path(setting).expanduser()
    if not path.is_file():
        return Check(name, FAIL, f"supernode.root_certificates {path} does not exist", f"{CERTS_FIX} to {path}")
    try:  # cryptography parses the parts of a certificate when they are first read
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        subject, is_ca = certificate.subject.rfc4514_string(), _is_ca(certificate)
        valid_from, valid_until = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    except (OSError, ValueError, x509.InvalidVersion) as err:
        return Check(name, FAIL, f"{path} is not a PEM X.509 certificate ({message(err)})", f"{CERTS_FIX} to {path}")
    if not is_ca:
        return Check(name, FAIL, f"{path} ({subject}) is not a CA certificate (no BasicConstraints ca=True)",
                     f"root_certificates must be the deployment's ca.crt, not a server certificate: {CERTS_FIX}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if now < valid_from:
        return Check(name, FAIL, f"{path} is valid only from {valid_from:%Y-%m-%d %H:%M} UTC",
                     "check this machine's clock")
    if now > valid_until:
        return Check(name, FAIL, f"{path} expired on {valid_until:%Y-%m-%d}",
                     "ask the coordinator for the deployment's new ca.crt (`fedistill certs`)")
    until = f"{path}: CA {subject}, valid until {valid_until:%Y-%m-%d}"
    if valid_until - now < EXPIRY_WARNING:
        return Check(name, WARN, f"{until}: expires within {EXPIRY_WARNING.days} days",
                     "ask the coordinator for the deployment's new ca.crt before then")
    return Check(name, OK, until)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_site_key(policy: SitePolicy) -> Check:
    """private_key is an unencrypted OpenSSH EC key on a NIST curve (what Flower's SuperNode loads),
    readable by its owner only."""
    name, setting = "site key", policy.supernode.private_key
    fix = "copy sites/<name>.key from the coordinator's `fedistill certs` output (an unencrypted OpenSSH EC key)"
    if setting is None:
        return Check(name, FAIL, "supernode.private_key is not set", f"set supernode.private_key: {fix}")
    path = Path(setting).expanduser()
    if not path.is_file():
        return Check(name, FAIL, f"supernode.private_key {path} does not exist", f"{fix} to {path}")
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        return Check(name, FAIL, f"{path} is not an unencrypted OpenSSH private key ({message(err)})", f"{fix} to {path}")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        kind = f"an EC key on {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        return Check(name, FAIL, f"{path} is {kind}; the SuperNode needs an EC key on {', '.join(NIST_CURVES)}",
                     f"{fix} to {path}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o037:
        return Check(name, FAIL, f"{path} has mode {mode:03o}: others may read or change the site's key",
                     f"chmod 600 {path}")
    if mode & 0o040:  # a Kubernetes Secret mounted with fsGroup is 0440: the group must be this site's alone
        return Check(name, WARN, f"{path} has mode {mode:03o}: group {path.stat().st_gid} may read the site's key",
                     f"chmod 600 {path}, or make sure that group holds only this site's service")
    return Check(name, OK, f"{path}: EC key on {key.curve.name}, mode {mode:03o}")


# -- the coordinator ------------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; ValueError names the value."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"supernode.superlink must be host:port, got {address!r}")
    return host, int(port)


def check_coordinator(policy: SitePolicy, *, tls: bool) -> Check:
    """The coordinator's SuperLink accepts a TCP connection and, with `tls`, completes a TLS handshake
    verified against root_certificates for the host name in supernode.superlink."""
    address = policy.supernode.superlink
    try:
        host, port = split_address(address)
    except ValueError as err:
        return Check("coordinator", FAIL, str(err), "set supernode.superlink to the coordinator's host:port")
    unreachable_fix = (f"check supernode.superlink ({address}) and the firewall: this machine needs outbound TCP to "
                       f"{host} port {port}, and the coordinator must be running `fedistill coordinator`")
    try:
        connection = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as err:
        return Check("coordinator", FAIL, f"{address} does not answer ({message(err)})", unreachable_fix)
    with connection:
        if policy.supernode.insecure:
            return check_plain_text(connection, host, address)
        if not tls:
            return Check("coordinator", WARN, f"{address} answers; TLS not checked (the CA certificate above failed)",
                         "fix the CA certificate, then run site-check again")
        ca = Path(str(policy.supernode.root_certificates)).expanduser()
        return check_tls(connection, host, address, ca, unreachable_fix)


def check_plain_text(connection: socket.socket, host: str, address: str) -> Check:
    """A site file that says insecure against a coordinator that serves TLS: its SuperNode would retry
    forever and the coordinator would log nothing, so a TLS handshake is tried (verifying nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with context.wrap_socket(connection, server_hostname=host):
            pass
    except (ssl.SSLError, OSError):
        return Check("coordinator", OK, f"{address} answers (plain text)")
    return Check("coordinator", FAIL, f"{address} serves TLS, but the site file says supernode.insecure: true: the "
                                      "site would retry forever and the coordinator would log nothing",
                 "set supernode.insecure: false, with root_certificates (ca.crt) and private_key (the site's key) "
                 "from the coordinator's `fedistill certs`")


def check_tls(connection: socket.socket, host: str, address: str, ca: Path, unreachable_fix: str) -> Check:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])  # what gRPC offers
    try:
        with context.wrap_socket(connection, server_hostname=host) as tls:
            version = tls.version()
            expires = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(tls.getpeercert()["notAfter"]),
                                                      datetime.timezone.utc)
    except ssl.SSLCertVerificationError as err:
        return Check("coordinator", FAIL, f"{address} answers, but its certificate does not verify against {ca}: "
                                          f"{err.verify_message}",
                     f"the coordinator's certificate must be signed by this CA and name {host}: {CERTS_FIX}, and use "
                     "the host name or IP address the coordinator's certificate was made for in supernode.superlink")
    except (ssl.SSLError, OSError) as err:
        return Check("coordinator", FAIL, f"{address} answers, but the TLS handshake fails ({message(err)})",
                     f"{unreachable_fix}; the port must be the SuperLink's, served with TLS")
    verified = f"{address} answers, {version} verified against {ca}; its certificate is valid until {expires:%Y-%m-%d}"
    if expires - datetime.datetime.now(datetime.timezone.utc) < EXPIRY_WARNING:
        return Check("coordinator", WARN, f"{verified}: it expires within {EXPIRY_WARNING.days} days",
                     "ask the coordinator to renew it (`fedistill certs --renew-server` there) before then")
    return Check("coordinator", OK, verified)


def site_is_running(policy: SitePolicy) -> bool:
    """Whether this site's `fedistill site` serves its metrics now (a metrics endpoint naming this site)."""
    if policy.metrics_port is None or policy.name is None:
        return False
    try:
        with urllib.request.urlopen(f"http://{policy.metrics_host}:{policy.metrics_port}/metrics",
                                    timeout=CONNECT_TIMEOUT_S) as response:
            return f'site="{policy.name}"' in response.read().decode(errors="replace")
    except OSError:
        return False


def check_registration(policy: SitePolicy) -> Check:
    """Join with the site's key, as its SuperNode will, and leave at once: whether the coordinator has
    the key registered. A key that is registered and online already (the site runs) is left as it is."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.supercore.error import FlowerError
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    import httpx

    link = policy.supernode
    key = load_ssh_private_key(Path(str(link.private_key)).expanduser().read_bytes(), password=None)
    ca = str(Path(str(link.root_certificates)).expanduser())
    request = ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()),
                                  heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL)
    try:
        with FleetHttpClient.from_server_address(link.superlink, False, ca, [
                NodeAuthHttpInterceptor(key, key.public_key())]) as client:
            node_id = client.ActivateNode(request).node_id
            client.DeactivateNode(DeactivateNodeRequest(node=Node(node_id=node_id)))
    except httpx.HTTPStatusError as err:
        error = FlowerError.from_json(err.response.text)
        if error is None or error.code != NODE_ACTIVATION_FAILED:
            return Check("registration", FAIL, f"the coordinator refused the site's key: "
                                               f"{error.message if error else err.response.text[:200]}",
                         "ask the coordinator to register the site's key again (`fedistill register`)")
        # Flower says the same (code 2004) for a key it does not know and for one whose SuperNode is
        # connected: this site's own metrics endpoint tells the second case.
        if site_is_running(policy):
            return Check("registration", OK, "the key is registered, and a SuperNode with it is online now "
                                             "(this site's `fedistill site` runs)")
        return Check("registration", FAIL, "the coordinator has not registered this site's key: the site would be "
                                           "refused (Flower code 2004; or a SuperNode with this key runs elsewhere)",
                     "send the site's .pub file to the coordinator, who runs `fedistill register "
                     "sites/<this site>.pub ...`; then run site-check again")
    except httpx.HTTPError as err:
        return Check("registration", FAIL, f"joining failed: {message(err)}",
                     "check supernode.superlink and that the coordinator runs `fedistill coordinator`")
    return Check("registration", OK, f"the key is registered as node {node_id} (joined and left again)")


# -- pins and metrics -----------------------------------------------------------------
