"""Signed model artifacts: the manifest the registry signs and the edge agent verifies, and their folders on disk.

The registry signs and the agent verifies the same canonical bytes, and both
keep each version in the same folder layout (`ArtifactStore`), so a version on
a device is byte for byte what the registry stored.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

MANIFEST_SCHEMA = 1
#: Artifact formats a registry publishes and an agent knows how to serve. "onnx-weights" is a
#: weight-only update (changed initializers, safetensors) applied to the model the device serves.
FORMATS = ("onnx", "onnx-int8", "onnx-fp16", "onnx-weights")
WEIGHTS_FORMAT = "onnx-weights"
_WEIGHTS_KEYS = ("base_version", "base_sha256", "target_sha256")


class ArtifactError(Exception):
    """An artifact or manifest that must not be served (bad hash, bad signature, malformed)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a signature covers: identity (version, sha256, size, format) and provenance metadata."""

    version: int
    sha256: str
    format: str
    bytes: int
    created_unix: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    schema: int = MANIFEST_SCHEMA

    def canonical(self) -> builtins.bytes:
        """Deterministic JSON (sorted keys, no whitespace): the exact bytes that are signed."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def parse(cls, data: builtins.bytes) -> Manifest:
        try:
            raw = json.loads(data.decode())
            manifest = cls(
                version=int(raw["version"]),
                sha256=str(raw["sha256"]),
                format=str(raw["format"]),
                bytes=int(raw["bytes"]),
                created_unix=float(raw.get("created_unix", 0.0)),
                metadata=dict(raw.get("metadata", {})),
                schema=int(raw.get("schema", MANIFEST_SCHEMA)),
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"malformed manifest: {err}") from err
        if manifest.schema != MANIFEST_SCHEMA:
            raise ArtifactError(f"unsupported manifest schema {manifest.schema}")
        if manifest.format not in FORMATS:
            raise ArtifactError(f"unknown artifact format {manifest.format!r}")
        if len(manifest.sha256) != 64:
            raise ArtifactError("manifest sha256 is not a 64-hex digest")
        if manifest.format == WEIGHTS_FORMAT and any(k not in manifest.metadata for k in _WEIGHTS_KEYS):
            raise ArtifactError(f"a weight-only update's manifest needs {_WEIGHTS_KEYS} in its metadata")
        return manifest

    @property
    def model_sha256(self) -> str:
        """The sha256 of the full model this artifact yields (for a weight-only update: after applying it)."""
        return str(self.metadata["target_sha256"]) if self.format == WEIGHTS_FORMAT else self.sha256


def make_manifest(version: int, data: bytes, fmt: str, metadata: dict[str, Any] | None = None) -> Manifest:
    if fmt not in FORMATS:
        raise ValueError(f"unknown artifact format {fmt!r}; known: {FORMATS}")
    return Manifest(version=version, sha256=sha256_hex(data), format=fmt, bytes=len(data),
                    created_unix=time.time(), metadata=dict(metadata or {}))


# ---- keys -----------------------------------------------------------------------


def generate_key(private_path: Path, public_path: Path | None = None) -> Ed25519PrivateKey:
    """Create an Ed25519 key pair as PEM files (private key written 0600)."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path = public_path or private_path.with_suffix(".pub.pem")
    public_path.write_bytes(public_pem(key.public_key()))
    return key


def load_or_create_key(private_path: Path) -> Ed25519PrivateKey:
    return load_private_key(private_path) if private_path.exists() else generate_key(private_path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path_or_pem: Path | bytes) -> Ed25519PublicKey:
    pem = path_or_pem if isinstance(path_or_pem, bytes) else Path(path_or_pem).read_bytes()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError("not an Ed25519 public key")
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---- sign / verify ---------------------------------------------------------------


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """Return (canonical manifest bytes, signature); ship both, verify the bytes as received."""
    canonical = manifest.canonical()
    return canonical, key.sign(canonical)


def verify_manifest(canonical: bytes, signature: bytes, key: Ed25519PublicKey) -> Manifest:
    """Check the signature over the received bytes before trusting anything they say."""
    try:
        key.verify(signature, canonical)
    except InvalidSignature as err:
        raise ArtifactError("manifest signature does not verify against the pinned registry key") from err
    return Manifest.parse(canonical)


def verify_artifact(data: bytes, manifest: Manifest) -> None:
    if len(data) != manifest.bytes:
        raise ArtifactError(f"artifact v{manifest.version} is {len(data)} bytes, manifest says {manifest.bytes}")
    digest = sha256_hex(data)
    if digest != manifest.sha256:
        raise ArtifactError(f"artifact v{manifest.version} sha256 {digest[:12]}... != manifest {manifest.sha256[:12]}...")


def verify_model(data: bytes, manifest: Manifest) -> None:
    """Check full model bytes against what the manifest says they must hash to (also after a weight update)."""
    digest = sha256_hex(data)
    if digest != manifest.model_sha256:
        raise ArtifactError(f"model for v{manifest.version} hashes to {digest[:12]}..., manifest says {manifest.model_sha256[:12]}...")


# ---- on disk ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoredArtifact:
    """One version on disk: its manifest, the exact signed bytes and signature, and where the model bytes are."""

    manifest: Manifest
    canonical: builtins.bytes
    signature: builtins.bytes
    path: Path


class ArtifactStore:
    """Versions as folders `ROOT/v000001/` (model.bin, manifest.json, manifest.sig).

    A version appears only once fully written (a hidden temporary folder, then a
    rename), so a crash or a concurrent reader never sees half of one.
    """

    MODEL, MANIFEST, SIGNATURE = "model.bin", "manifest.json", "manifest.sig"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def model_path(self, version: int) -> Path:
        return self.folder(version) / self.MODEL

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit())

    def write(self, manifest: Manifest, canonical: builtins.bytes, signature: builtins.bytes,
              data: builtins.bytes) -> StoredArtifact:
        """Store a version (replacing a leftover of the same number); `canonical` and `signature` as received."""
        final = self.folder(manifest.version)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir()
        (tmp / self.MODEL).write_bytes(data)
        (tmp / self.MANIFEST).write_bytes(canonical)
        (tmp / self.SIGNATURE).write_bytes(signature)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return StoredArtifact(manifest, canonical, signature, self.model_path(manifest.version))

    def read(self, version: int, key: Ed25519PublicKey | None = None) -> StoredArtifact:
        """A stored version; with `key`, its manifest must verify against it (what a device trusts after a restart)."""
        folder = self.folder(version)
        canonical = (folder / self.MANIFEST).read_bytes()
        signature = (folder / self.SIGNATURE).read_bytes()
        manifest = verify_manifest(canonical, signature, key) if key is not None else Manifest.parse(canonical)
        return StoredArtifact(manifest, canonical, signature, self.model_path(version))

    def remove(self, version: int) -> None:
        shutil.rmtree(self.folder(version), ignore_errors=True)
