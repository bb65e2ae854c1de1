"""Making the deployment's keys and certificates with `cryptography`: its CA, the SuperLink's
TLS certificate, SuperNode key pairs in OpenSSH format. `fedistill certs` writes them."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# P-384 everywhere: Flower requires a NIST curve for SuperNode keys and its docs use P-384;
# for the CA and server an EC key is also far faster to make than RSA-4096, at similar strength.
CURVE = ec.SECP384R1
SIGNATURE_HASH = hashes.SHA384
# Backdate certificates a little: a site whose clock runs behind would otherwise reject a
# certificate that is "not yet valid" in the first minutes after it was made.
CLOCK_SKEW = datetime.timedelta(minutes=5)


def issue_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA; path length 0: it signs the server certificate, never another CA."""
    key = ec.generate_private_key(CURVE())
    public_key = key.public_key()
    # A unique name, so two deployments' CAs are never confused with each other in a trust store.
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedistill"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"fedistill deployment CA {os.urandom(4).hex()}"),
    ])
    not_before, not_after = _validity(days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, SIGNATURE_HASH())
    )
    return key, certificate


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    ip_addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a TLS server certificate for it, signed by the CA, naming exactly these hosts/IPs."""
    key = ec.generate_private_key(CURVE())
    public_key = key.public_key()
    # Clients match the SAN, never the CN; the CN is for people reading the certificate.
    common_name = dns_names[0] if dns_names else str(ip_addresses[0])
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(a) for a in ip_addresses]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_before, not_after = _validity(days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedistill"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),  # X.509 caps the CN at 64
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))  # never outlive its CA
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, SIGNATURE_HASH())
    )
    return key, certificate


def make_site_key(name: str) -> tuple[bytes, bytes]:
    """(private key, public key) of a new SuperNode key pair, both in OpenSSH format, EC P-384."""
    key = ec.generate_private_key(CURVE())
    private_openssh = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public_openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # The comment tells the coordinator whose key this is; Flower ignores it.
    return private_openssh, public_openssh + f" fedistill-site-{name}\n".encode()


def subject_alt_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The certificate's SAN as "DNS:name" / "IP:address" strings, in order."""
    names: list[str] = []
    for entry in alternative_names(certificate):
        prefix = "DNS" if isinstance(entry, x509.DNSName) else "IP" if isinstance(entry, x509.IPAddress) else "other"
        names.append(f"{prefix}:{entry.value}")
    return tuple(names)


def alternative_names(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - CLOCK_SKEW, now + datetime.timedelta(days=days)


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )
