"""A throwaway certificate authority for the demo, the tests and loopback benchmarks.

It makes the default path the secure one: `overnight demo` and the end-to-end tests run over
verified TLS with certificates minted here, never over plaintext. Production coordinators use
certificates from a real CA (`overnight serve --tls-cert --tls-key`); nothing here is meant to
outlive the process or directory that made it.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_runtime.channel import ServerTrust
from server.private_files import write_private_file
from server.transport_security import ServerTls

# Names a loopback coordinator answers to: the targets tests and the demo dial.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
validity = datetime.timedelta(days=2)


@dataclasses.dataclass(frozen=True)
class IssuedCertificate:
    """A PEM certificate chain (leaf first) and its PEM private key."""

    certificate_chain: bytes
    private_key: bytes


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if unit is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name(attributes)


def _subject_alternative_names(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class DevelopmentCa:
    """A P-256 certificate authority that lives in memory; issues server and client certs."""

    def __init__(self, name: str = "Overnight development CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def root_certificate(self) -> bytes:
        """The CA certificate (PEM): what clients trust (`--root-certs`)."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    def issue_server(self, names: tuple[str, ...] = LOOPBACK_NAMES) -> IssuedCertificate:
        """A TLS server certificate for these DNS names and IP addresses."""
        return self._issue(
            _name(names[0]),
            ExtendedKeyUsageOID.SERVER_AUTH,
            _subject_alternative_names(names),
        )

    def issue_client(self, common_name: str, unit: str) -> IssuedCertificate:
        """A TLS client certificate; `unit` (the subject's OU) carries e.g. an operator role."""
        return self._issue(_name(common_name, unit), ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def _issue(
        self,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        alternative_names: x509.SubjectAlternativeName | None,
    ) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alternative_names is not None:
            builder = builder.add_extension(alternative_names, critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key)
        )


def loopback_security() -> tuple[ServerTls, ServerTrust]:
    """A fresh CA's loopback server TLS and the trust that verifies it: for a coordinator and
    its clients in one program (demo, benchmarks)."""
    ca = DevelopmentCa()
    issued = ca.issue_server()
    return (
        ServerTls(issued.certificate_chain, issued.private_key),
        ServerTrust(root_certificates=ca.root_certificate),
    )


@dataclasses.dataclass(frozen=True)
class CertificateFiles:
    root_certs: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path


def write_loopback_certificates(directory: str | pathlib.Path) -> CertificateFiles:
    """A fresh CA and a loopback server certificate, as the PEM files `overnight serve
    --tls-cert --tls-key` and clients' `--root-certs` take (private key 0600)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = DevelopmentCa()
    server = ca.issue_server()
    files = CertificateFiles(
        directory / "ca.pem", directory / "server.pem", directory / "server.key"
    )
    files.root_certs.write_bytes(ca.root_certificate)
    files.server_cert.write_bytes(server.certificate_chain)
    write_private_file(files.server_key, server.private_key)
    return files
