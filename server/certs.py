"""Credentials for a secured Flower deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

What Flower 1.39 reads:
- SuperLink: `--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`
  (PEM; the certificate's SANs must name every address nodes, the CLI and the
  SuperLink's own ServerApp process use, hence 127.0.0.1 and localhost always);
- SuperNode and `flwr` CLI: `ca.crt` as root certificate;
- SuperNode authentication: an EC key on a NIST curve, the private half in OpenSSH
  format (`--auth-supernode-private-key node-0.key`), the public half as an OpenSSH
  line (`flwr supernode register node-0.pub`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
VALID_DAYS = 365
CURVE = ec.SECP384R1


@dataclass
class Credentials:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[tuple[Path, Path]] = field(default_factory=list)  # (private, public)


def _write(path: Path, data: bytes, private: bool) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge federation CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _server(now: dt.datetime, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
            hosts: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def node_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """One SuperNode's authentication key: OpenSSH private key file and `.pub` line."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (_write(folder / f"{name}.key", private, private=True),
            _write(folder / f"{name}.pub", public + f" {name}\n".encode(), private=False))


def create_credentials(folder: str | Path, nodes: int = 3, hosts: list[str] | None = None) -> Credentials:
    """Write ca.crt/ca.key, server.pem/server.key (SANs: loopback plus `hosts`) and node-<i>.key/.pub."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _ca(now)
    names = [*(hosts or []), *DEFAULT_HOSTS] if hosts else list(DEFAULT_HOSTS)
    server_key, server_cert = _server(now, ca_key, ca_cert, names)
    creds = Credentials(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False),
        ca_key=_write(out / "ca.key", _key_pem(ca_key), private=True),
        server_cert=_write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), private=False),
        server_key=_write(out / "server.key", _key_pem(server_key), private=True),
    )
    creds.node_keys = [node_key_pair(out, f"node-{i}") for i in range(nodes)]
    return creds
