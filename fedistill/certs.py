"""`fedistill certs`: the TLS files and SuperNode keys of one deployment, made with `cryptography` only.

What one call writes into `--out` (default `certs/`):

    ca.crt, ca.key            the deployment's own certificate authority (EC P-384)
    server.crt, server.key    the SuperLink's TLS certificate, signed by that CA; its
                              SubjectAlternativeName holds every --host and --ip
    sites/<name>.key          a site's SuperNode authentication key: OpenSSH format, EC P-384,
                              no passphrase (what `flower-supernode --auth-supernode-private-key`
                              loads with `load_ssh_private_key`)
    sites/<name>.pub          its public half, OpenSSH format (what `flwr supernode register`
                              loads with `load_ssh_public_key`)

Who gets what: the coordinator gets ca.crt, server.crt and server.key (`flower-superlink
--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key`); each site gets
ca.crt (`flower-supernode --root-certificates ca.crt`) and its own sites/<name>.key; each
sites/<name>.pub is registered on the coordinator. ca.key goes to no machine: keep it offline.

Private keys are created with mode 0600 from the first byte, and sites/ is 0700.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedistill.pki import issue_ca, issue_server_certificate, make_site_key, alternative_names, subject_alt_names

DEFAULT_OUT = Path("certs")
DEFAULT_HOSTS = ["localhost"]
DEFAULT_IPS = ["127.0.0.1"]
DEFAULT_DAYS = 365
DEFAULT_PORT = 8000  # `fedistill coordinator --port`'s default

SITE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SITE_NAME_RULE = "letters, digits, '_', '.' and '-' only, not starting with '.' (it becomes a file name)"

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What `make_deployment` left in `out`: every path, and which files this call wrote."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, Path] = dataclasses.field(default_factory=dict)  # the sites this call made, by name
    site_public_keys: dict[str, Path] = dataclasses.field(default_factory=dict)
    server_names: tuple[str, ...] = ()  # server.crt's SAN as "DNS:name" / "IP:addr"
    written: tuple[Path, ...] = ()
    reused_ca: bool = False  # True when ca.crt was already there and only sites were added


def make_deployment(
    out: Path,
    *,
    hosts: list[str] | None = None,
    ips: list[str] | None = None,
    sites: list[str],
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> Deployment:
    """Write a deployment's CA, server certificate and site keys into `out`; return their paths.

    A new deployment (no ca.crt in `out`, or `overwrite=True`) gets a new CA, a server
    certificate naming every DNS name in `hosts` and every IP address in `ips` (None means
    `localhost` / `127.0.0.1`; an empty list means none of that kind), valid for `days` days,
    and a key pair per name in `sites`.

    Adding sites later: when `out` already holds ca.crt, server.crt and server.key, the CA and
    the server certificate are kept as they are (ca.crt stays byte-identical, so no machine has
    to be given a new one) and only the new sites' keys are written. ca.key is not needed for
    that, so it may already be offline. `hosts`/`ips`, when given, must then match what
    server.crt names: changing the coordinator's names means re-issuing (`overwrite=True`).

    `overwrite=True` re-issues the CA and the server certificate and rewrites the named sites'
    keys; every site then needs the new ca.crt. Keys of sites not named are left alone: they
    are not tied to the CA, so their registrations stay valid.

    Raises ValueError for a bad site name, IP address, host name or `days`, and
    FileExistsError (naming the file) instead of replacing a file without `overwrite`.
    Everything is checked before the first file is written.
    """
    out = Path(out)
    paths = _deployment_paths(out)
    site_names = _checked_site_names(sites)
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}: give --days N with N >= 1")
    dns_names = _checked_hosts(DEFAULT_HOSTS if hosts is None else hosts)
    ip_addresses = _checked_ips(DEFAULT_IPS if ips is None else ips)

    # Check everything first, so that a refusal leaves `out` as it was.
    reuse = not overwrite and paths.ca_cert.exists()
    if reuse:
        ca_cert = _existing_deployment_ca(paths, site_names)
        kept_server_cert = _kept_server_certificate(paths, ca_cert, dns_names if hosts is not None else None,
                                                    ip_addresses if ips is not None else None)
    else:
        if not dns_names and not ip_addresses:
            raise ValueError("the server certificate needs at least one name: give --host NAME or --ip ADDR")
        if not overwrite:
            _refuse_existing([paths.ca_key, paths.server_cert, paths.server_key])
    if not overwrite:
        _refuse_existing([p for name in site_names for p in site_paths(out, name)],
                         "choose another site name, or pass --overwrite to replace it (that also re-issues "
                         "the CA and server certificate)" if reuse else None)

    _make_private_dir(out)
    if reuse:
        server_cert, written = kept_server_cert, []
    else:
        server_cert, written = _write_ca_and_server(paths, dns_names, ip_addresses, days, overwrite)
    site_keys, site_public_keys = _write_site_keys(out, site_names, overwrite)
    written += [path for name in site_names for path in (site_keys[name], site_public_keys[name])]
    return dataclasses.replace(
        paths, site_keys=site_keys, site_public_keys=site_public_keys,
        server_names=subject_alt_names(server_cert), written=tuple(written), reused_ca=reuse,
    )


def renew_server_certificate(out: Path, days: int = DEFAULT_DAYS) -> x509.Certificate:
    """A new server key and certificate in `out`, for the names the old one had, signed by the same CA
    (ca.key, brought back from offline for this): no site needs anything new. Returns the certificate."""
    out = Path(out)
    paths = _deployment_paths(out)
    missing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing: renewing the server certificate needs the deployment's "
                                "ca.crt, its ca.key (bring it back from where it is kept offline) and the old server.crt")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}: give --days N with N >= 1")
    ca_cert = load_certificate(paths.ca_cert)
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if ca_key.public_key() != ca_cert.public_key():
        raise ValueError(f"{paths.ca_key} is not the key of {paths.ca_cert}: bring back this deployment's ca.key")
    names = alternative_names(load_certificate(paths.server_cert))
    server_key, server_cert = issue_server_certificate(
        ca_key, ca_cert, names.get_values_for_type(x509.DNSName), names.get_values_for_type(x509.IPAddress), days)
    _write_pem_pair(paths.server_cert, server_cert, paths.server_key, server_key, overwrite=True)
    return server_cert


def _write_ca_and_server(
    paths: Deployment,
    dns_names: list[str],
    ip_addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    days: int,
    overwrite: bool,
) -> tuple[x509.Certificate, list[Path]]:
    """A new CA and server certificate in `paths`; returns the certificate and the files written."""
    ca_key, ca_cert = issue_ca(days)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, dns_names, ip_addresses, days)
    written = _write_pem_pair(paths.ca_cert, ca_cert, paths.ca_key, ca_key, overwrite)
    written += _write_pem_pair(paths.server_cert, server_cert, paths.server_key, server_key, overwrite)
    return server_cert, written


def _write_site_keys(out: Path, site_names: list[str], overwrite: bool) -> tuple[dict[str, Path], dict[str, Path]]:
    """A new key pair per site under out/sites/; returns ({name: key file}, {name: public key file})."""
    site_keys: dict[str, Path] = {}
    site_public_keys: dict[str, Path] = {}
    if site_names:
        _make_private_dir(out / "sites")
    for name in site_names:
        key_path, pub_path = site_paths(out, name)
        private_openssh, public_openssh = make_site_key(name)
        _write_file(key_path, private_openssh, PRIVATE_FILE_MODE, overwrite)
        _write_file(pub_path, public_openssh, PUBLIC_FILE_MODE, overwrite)
        site_keys[name], site_public_keys[name] = key_path, pub_path
    return site_keys, site_public_keys


# --- checking what was asked -------------------------------------------------------------


def _checked_site_names(sites: list[str]) -> list[str]:
    names: list[str] = []
    for name in sites:
        # A leading "." would make hidden files (and ".." looks like a path).
        if not SITE_NAME.fullmatch(name) or name.startswith("."):
            raise ValueError(f"bad site name {name!r}: use {SITE_NAME_RULE}")
        if name in names:
            raise ValueError(f"site {name!r} is named twice: give each --site once")
        names.append(name)
    return names


def _checked_hosts(hosts: list[str]) -> list[str]:
    names: list[str] = []
    for host in hosts:
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"bad host name {host!r}: give a non-empty DNS name without spaces, e.g. --host localhost")
        if not host.isascii():
            raise ValueError(f"bad host name {host!r}: give its ASCII (punycode, xn--...) form")
        if _is_ip(host):
            # A DNS entry holding an address is not matched when a client dials that address.
            raise ValueError(f"host name {host!r} is an IP address: give it with --ip {host}")
        if host not in names:
            names.append(host)
    return names


def _checked_ips(ips: list[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in ips:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"bad IP address {text!r}: give an IPv4 or IPv6 address, e.g. --ip 127.0.0.1 "
                             "(a DNS name goes to --host)") from None
        if address not in addresses:
            addresses.append(address)
    return addresses


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# --- an existing deployment: what is kept ------------------------------------------------


def _existing_deployment_ca(paths: Deployment, site_names: list[str]) -> x509.Certificate:
    """The CA of the deployment already in `out`, which is only being given new sites."""
    missing = [p for p in (paths.server_cert, paths.server_key) if not p.exists()]
    if missing:
        raise FileExistsError(
            f"{paths.ca_cert} exists but {missing[0]} does not: this is not a complete deployment. "
            "Pass --overwrite to make a new one, or choose another --out")
    if not site_names:
        raise FileExistsError(
            f"{paths.ca_cert} already exists: pass --site NAME to add a site with this CA, "
            "--overwrite to re-issue everything, or choose another --out")
    return load_certificate(paths.ca_cert)


def _kept_server_certificate(
    paths: Deployment,
    ca_cert: x509.Certificate,
    dns_names: list[str] | None,
    ip_addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None,
) -> x509.Certificate:
    """server.crt, checked to come from ca.crt and, where names were asked for, to hold them."""
    server_cert = load_certificate(paths.server_cert)
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        raise ValueError(f"{paths.server_cert} was not signed by {paths.ca_cert}: "
                         "the files are from different deployments; pass --overwrite to re-issue") from None
    names = alternative_names(server_cert)
    asked = {"--host": (dns_names, names.get_values_for_type(x509.DNSName)),
             "--ip": (ip_addresses, names.get_values_for_type(x509.IPAddress))}
    for flag, (wanted, present) in asked.items():
        if wanted is not None and set(wanted) != set(present):
            shown = ", ".join(str(v) for v in present) or "none"
            raise ValueError(
                f"{paths.server_cert} is kept when sites are added, and it names {flag} {shown}, not "
                f"{', '.join(str(v) for v in wanted) or 'none'}: leave out {flag}, or pass --overwrite to "
                "re-issue the CA and server certificate")
    return server_cert


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (ValueError, x509.InvalidVersion) as err:
        raise ValueError(f"{path} is not a PEM certificate ({err}): pass --overwrite to re-issue it") from None


def _refuse_existing(paths: list[Path], fix: str | None = None) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} already exists: "
                                  f"{fix or 'pass --overwrite to replace it, or choose another --out'}")


# --- writing files -----------------------------------------------------------------------


def _deployment_paths(out: Path) -> Deployment:
    """A Deployment with only the paths filled in: where each file of `out` goes."""
    return Deployment(out=out, ca_cert=out / "ca.crt", ca_key=out / "ca.key",
                      server_cert=out / "server.crt", server_key=out / "server.key")


def site_paths(out: Path, name: str) -> tuple[Path, Path]:
    return out / "sites" / f"{name}.key", out / "sites" / f"{name}.pub"


def _make_private_dir(path: Path) -> None:
    """Create `path` (and parents) if missing; a folder this module creates is 0700."""
    if path.is_dir():
        if path.name == "sites":
            os.chmod(path, PRIVATE_DIR_MODE)  # it holds the sites' private keys
        return
    path.mkdir(parents=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is cut by the umask; the folder is still empty here


def _write_pem_pair(cert_path: Path, certificate: x509.Certificate, key_path: Path,
                    key: ec.EllipticCurvePrivateKey, overwrite: bool) -> list[Path]:
    # PKCS#8 PEM: what Python's ssl (the SuperLink's uvicorn) and gRPC both load.
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_file(key_path, key_pem, PRIVATE_FILE_MODE, overwrite)
    _write_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE, overwrite)
    return [cert_path, key_path]


def _write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write `data` to a file that has `mode` from the moment it exists.

    Without `overwrite`, O_EXCL makes creating fail if the file appeared after the checks.
    With it, the data goes to a new file that then replaces the old one: opening the old file
    would keep its mode (perhaps world-readable), and the swap is atomic.
    """
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if overwrite else path
    if overwrite:
        target.unlink(missing_ok=True)  # left by a crashed run that had this PID
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


# --- the command -------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `certs` subcommand; its handler is `run` (also set as the `handler` default)."""
    parser = subparsers.add_parser(
        "certs",
        help="make the deployment's CA, server certificate and site keys",
        description="Make a certificate authority, the coordinator's TLS certificate and one SuperNode "
                    "key pair per site. Run it again with --site NAME (and the same --out) to add a site: "
                    "the CA and server certificate are kept.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder to write into (default: {DEFAULT_OUT})")
    parser.add_argument("--host", action="append", metavar="NAME",
                        help="a DNS name the sites dial the coordinator by; repeatable (default: localhost)")
    parser.add_argument("--ip", action="append", metavar="ADDR",
                        help="an IP address the sites dial the coordinator by; repeatable (default: 127.0.0.1)")
    parser.add_argument("--site", action="append", default=[], metavar="NAME",
                        help=f"a site to make a key pair for; repeatable ({SITE_NAME_RULE})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                        help=f"the coordinator's port, for the commands printed (default: {DEFAULT_PORT}, "
                             "`fedistill coordinator`'s)")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, metavar="N",
                        help=f"validity of the CA and server certificates in days (default: {DEFAULT_DAYS})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files: a new CA and server certificate, new keys for the named sites")
    parser.add_argument("--renew-server", action="store_true",
                        help="only re-issue server.crt and server.key (same names, same CA; needs ca.key) for --days "
                             "more; sites keep everything they have. Restart the coordinator after it")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # --host/--ip are None unless given, so adding a site to an existing deployment does not
    # have to repeat the coordinator's names (make_deployment checks them only when given).
    try:
        if args.renew_server:
            if args.site or args.host or args.ip or args.overwrite:
                raise ValueError("--renew-server keeps the server's names and every site: give it alone (with --out "
                                 "and --days)")
            renewed = renew_server_certificate(args.out, args.days)
            ca_until = load_certificate(args.out / "ca.crt").not_valid_after_utc
            capped = (f" (capped at the CA's expiry: to go beyond {ca_until:%Y-%m-%d}, make a new CA with --overwrite "
                      "and give every site the new ca.crt)") if renewed.not_valid_after_utc >= ca_until else ""
            print(f"Renewed {args.out / 'server.crt'} and server.key, valid until {renewed.not_valid_after_utc:%Y-%m-%d}"
                  f"{capped}, for {', '.join(subject_alt_names(renewed))}; the sites keep their files.\n"
                  f"Next: restart the coordinator (`fedistill coordinator --certs {args.out}`): it reads the "
                  "certificate when it starts. Put ca.key back offline.")
            return 0
        deployment = make_deployment(args.out, hosts=args.host, ips=args.ip, sites=list(args.site),
                                     days=args.days, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"fedistill certs: {err}", file=sys.stderr)
        return 2
    print(format_summary(deployment, args.port))
    return 0


def dial_host(server_names: tuple[str, ...]) -> str:
    """The host a site dials the coordinator by: the server certificate's first name (a DNS name first)."""
    value = server_names[0].split(":", 1)[1]
    return f"[{value}]" if ":" in value else value


def format_summary(deployment: Deployment, port: int = DEFAULT_PORT) -> str:
    """What was written, and who gets which file."""
    out = deployment.out
    lines = [f"Wrote into {out}/:"]
    lines += [f"  {path.relative_to(out)}" for path in deployment.written]
    if deployment.reused_ca:
        lines.append("Kept the existing CA and server certificate (ca.crt unchanged: the sites already have it).")
    lines.append(f"The server certificate names {', '.join(deployment.server_names)}: "
                 "sites must dial the coordinator by one of these.")
    coordinator_files = f"{deployment.ca_cert}, {deployment.server_cert}, {deployment.server_key}"
    lines += ["", "Next steps:"]
    if deployment.reused_ca:
        lines.append(f"  1. The coordinator keeps the {coordinator_files} it already has.")
    else:
        lines += [
            f"  1. To the coordinator (SuperLink): {coordinator_files}; start it there with",
            f"       fedistill coordinator --certs {out}" + ("" if port == DEFAULT_PORT else f" --port {port}"),
        ]
    lines.append("  2. To each site, over a private channel: ca.crt and its own key, nothing else")
    lines += [f"       {name}: {deployment.ca_cert}, {key}" for name, key in deployment.site_keys.items()]
    if not deployment.site_keys:
        lines.append("       (no sites yet: add each later with --site NAME and the same --out)")
    lines.append("  3. On the coordinator, in the folder it was started in, register each site's public key "
                 "(it is not secret):")
    coordinator = f"{dial_host(deployment.server_names)}:{port}"
    lines += [f"       fedistill register {pub} --coordinator {coordinator} --ca {deployment.ca_cert}"
              for pub in deployment.site_public_keys.values()]
    lines.append(f"Keep {deployment.ca_key} offline: it goes to no machine (not the coordinator, not a site); "
                 "whoever has it can impersonate the coordinator. It is needed only to re-issue server.crt.")
    return "\n".join(lines)
