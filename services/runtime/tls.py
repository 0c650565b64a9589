"""A local certificate authority for mutual TLS between acsp processes, and gRPC credentials.

How identities travel:

* When ``ACSP_TLS_CA``, ``ACSP_TLS_CERT`` and ``ACSP_TLS_KEY`` are set, a service's gRPC port
  requires mutual TLS: every caller presents a certificate signed by that CA. (grpcio's
  Python API can only require client certificates or not request them at all, so people's
  tools get a client certificate too.)
* A certificate issued by :func:`issue_service_cert` names the service in its common name and
  in a URI SAN ``spiffe://acsp/service/<name>``. The auth interceptor turns such a peer into a
  ``service`` principal without any token.
* A certificate from :func:`issue_client_cert` has a URI SAN ``spiffe://acsp/client/<name>``
  and grants nothing by itself: its holder must also send a bearer token.

Create the files for a local mesh once::

    paths = ensure_local_pki(data_dir, services=["grant", "metering", "scheduler"])
    # data_dir/tls/ca.crt, grant.crt, grant.key, ..., client.crt, client.key

then point each service's ``ACSP_TLS_*`` variables at its files. :func:`server_credentials` and
:func:`channel_credentials` build the grpcio credentials from them.

The NATS connection has TLS settings of its own (``ACSP_NATS_TLS_CA``, ``_CERT``, ``_KEY``),
because the NATS server may be signed by another CA and may not ask for client certificates;
:func:`load_nats_ssl_context` builds its ``ssl.SSLContext``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.runtime.settings import Settings, SettingsError

SPIFFE_TRUST_DOMAIN: Final = "acsp"
SERVICE_URI_PREFIX: Final = f"spiffe://{SPIFFE_TRUST_DOMAIN}/service/"
CLIENT_URI_PREFIX: Final = f"spiffe://{SPIFFE_TRUST_DOMAIN}/client/"
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1", "::1")

CA_VALIDITY: Final = datetime.timedelta(days=3650)
LEAF_VALIDITY: Final = datetime.timedelta(days=365)
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertPaths:
    """PEM files of one identity: its certificate, its key and the CA that signed it."""

    ca: Path
    cert: Path
    key: Path


def tls_dir(data_dir: Path) -> Path:
    """Return the folder under ``data_dir`` that contains the CA and issued certificates."""
    return data_dir / "tls"


def generate_ca(data_dir: Path, name: str = "acsp local CA") -> CertPaths:
    """Create a self-signed CA in ``data_dir/tls`` (ca.crt, ca.key), replacing any there."""
    folder = tls_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths = CertPaths(ca=folder / "ca.crt", cert=folder / "ca.crt", key=folder / "ca.key")
    _write_private_key(paths.key, key)
    paths.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def issue_service_cert(
    data_dir: Path, service: str, hosts: Iterable[str] = DEFAULT_HOSTS
) -> CertPaths:
    """Issue ``<service>.crt``/``.key`` for server and client use, naming the service.

    ``hosts`` are the DNS names and IP addresses callers dial. The service name is added as a
    DNS name too, so a Kubernetes service of that name verifies.
    """
    uri = SERVICE_URI_PREFIX + service
    return _issue(data_dir, service, uri, [*hosts, service], server=True)


def issue_client_cert(data_dir: Path, name: str = "client") -> CertPaths:
    """Issue ``<name>.crt``/``.key`` for a person's tools; it must be used with a token."""
    return _issue(data_dir, name, CLIENT_URI_PREFIX + name, [], server=False)


def ensure_local_pki(
    data_dir: Path, services: Iterable[str], clients: Iterable[str] = ("client",)
) -> dict[str, CertPaths]:
    """Create the CA and each missing certificate under ``data_dir/tls``; keep existing ones.

    Returns the paths by identity name (services and clients).
    """
    folder = tls_dir(data_dir)
    if not (folder / "ca.crt").is_file() or not (folder / "ca.key").is_file():
        generate_ca(data_dir)
    paths: dict[str, CertPaths] = {}
    for service in services:
        paths[service] = _existing(folder, service) or issue_service_cert(data_dir, service)
    for client in clients:
        paths[client] = _existing(folder, client) or issue_client_cert(data_dir, client)
    return paths


def server_credentials(ca: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    """Build credentials for a server port that requires CA-signed client certificates."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """Build credentials for a channel that verifies the server and presents ``cert``."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )


def load_server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """Build mutual-TLS server credentials from ``ACSP_TLS_*``; raise SettingsError if unusable."""
    ca, cert, key = _checked_tls_files(settings)
    return server_credentials(ca, cert, key)


def load_channel_credentials(settings: Settings) -> grpc.ChannelCredentials:
    """Build mutual-TLS channel credentials from ``ACSP_TLS_*``; raise SettingsError if unusable."""
    ca, cert, key = _checked_tls_files(settings)
    return channel_credentials(ca, cert, key)


def load_nats_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Build the SSL context for the NATS connection; None when it stays plaintext.

    TLS is used when a URL is tls:// or wss://, or any ``ACSP_NATS_TLS_*`` is set. The server
    certificate is verified, host name included, against ``ACSP_NATS_TLS_CA``, else
    ``ACSP_TLS_CA``, else the system's CAs. ``ACSP_NATS_TLS_CERT`` and ``ACSP_NATS_TLS_KEY``
    add a client certificate. Raise SettingsError naming the variable whose file is unusable.
    """
    if not settings.nats_tls_required:
        return None
    ca_variable, ca = "ACSP_NATS_TLS_CA", settings.nats_tls_ca
    if ca is None and settings.tls_ca is not None:
        ca_variable, ca = "ACSP_TLS_CA", settings.tls_ca
    if ca is not None:
        _check_pem(ca_variable, ca, certificate=True)
    try:
        # With a cafile, create_default_context trusts that CA alone, not the system's.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except ssl.SSLError as error:
        raise SettingsError(
            ca_variable,
            f"{ca} cannot be loaded as a CA ({error.reason or error})",
            "point it to the PEM certificate of the CA that signs the NATS server certificate",
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = settings.nats_tls_cert, settings.nats_tls_key
    if cert is not None and key is not None:
        _check_pem("ACSP_NATS_TLS_CERT", cert, certificate=True)
        _check_pem("ACSP_NATS_TLS_KEY", key, certificate=False)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as error:
            raise SettingsError(
                "ACSP_NATS_TLS_KEY",
                f"{key} does not match the certificate in {cert} ({error.reason or error})",
                "point ACSP_NATS_TLS_CERT and ACSP_NATS_TLS_KEY to one certificate and its key",
            ) from None
    return context


def _checked_tls_files(settings: Settings) -> tuple[Path, Path, Path]:
    ca = settings.require("tls_ca")
    cert = settings.require("tls_cert")
    key = settings.require("tls_key")
    _check_pem("ACSP_TLS_CA", ca, certificate=True)
    _check_pem("ACSP_TLS_CERT", cert, certificate=True)
    _check_pem("ACSP_TLS_KEY", key, certificate=False)
    return ca, cert, key


def _check_pem(variable: str, path: Path, *, certificate: bool) -> None:
    data = path.read_bytes()
    try:
        if certificate:
            x509.load_pem_x509_certificate(data)
        else:
            serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        kind = "certificate" if certificate else "unencrypted private key"
        raise SettingsError(
            variable,
            f"{path} is not a PEM {kind} ({error})",
            "point it to a file written by services.runtime.tls.ensure_local_pki",
        ) from None


def service_name_from_uri(uri: str) -> str | None:
    """Return ``grant`` for ``spiffe://acsp/service/grant``, None for any other URI."""
    if uri.startswith(SERVICE_URI_PREFIX):
        name = uri[len(SERVICE_URI_PREFIX) :]
        return name or None
    return None


def _issue(data_dir: Path, name: str, uri: str, hosts: list[str], *, server: bool) -> CertPaths:
    folder = tls_dir(data_dir)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{folder / 'ca.key'} is not an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)

    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for host in dict.fromkeys(hosts):
        alt_names.append(_host_name(host))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = CertPaths(ca=folder / "ca.crt", cert=folder / f"{name}.crt", key=folder / f"{name}.key")
    _write_private_key(paths.key, key)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _existing(folder: Path, name: str) -> CertPaths | None:
    paths = CertPaths(ca=folder / "ca.crt", cert=folder / f"{name}.crt", key=folder / f"{name}.key")
    return paths if paths.cert.is_file() and paths.key.is_file() else None


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create the file owner-only before any key byte reaches it.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    os.chmod(path, 0o600)
