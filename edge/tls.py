"""TLS for fedge's own gRPC services (the edge registry): the same CA and server certificate as the SuperLink's.

Without certificates, channels and ports are plaintext (loopback and trusted
networks); with them, a registry serves only TLS and a client trusts only the
given CA, so the publish token and the artifacts never cross the network in clear.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def open_channel(address: str, root_certificates: Path | None = None) -> grpc.Channel:
    """A channel to `address`: TLS trusting `root_certificates` (PEM CA) when given, else plaintext."""
    if root_certificates is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(root_certificates).read_bytes())
    return grpc.secure_channel(address, credentials)


def add_port(server: grpc.Server, address: str, certificate: Path | None = None, key: Path | None = None) -> int:
    """Bind `address`: TLS with the PEM certificate chain and key when given, else plaintext; the bound port."""
    if (certificate is None) != (key is None):
        raise ValueError("TLS needs both a certificate and its private key")
    if certificate is None or key is None:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(certificate).read_bytes())])
    return server.add_secure_port(address, credentials)
