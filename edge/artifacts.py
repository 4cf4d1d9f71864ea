"""Signed model artifacts: the manifest the registry signs and the edge agent verifies, and their folders on disk.

A version is a bundle: one signed manifest names every file that shares the
version number (fp32, fp16 and int8 ONNX, engine plans, the reference set),
each with its sha256 and size, so a device that takes int8 and one that takes
fp32 serve the same version. The registry signs and the agent verifies the
same canonical bytes, and both keep each version in the same folder layout
(`ArtifactStore`), so a file on a device is byte for byte what the registry stored.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

MANIFEST_SCHEMA = 2
#: What kind of file a format of a version is. "onnx": a whole model; "onnx-weights": a weight-only update (changed
#: initializers, safetensors) applied to the model of the same precision the device serves; "onnx-adapter": an
#: adapter update (the coded change of an unmerged graph's LoRA adapter, `fedge.edge.adapters`) applied to the
#: unmerged graph the device serves; "tensorrt": an engine plan built for one device class (GPU and TensorRT
#: version); "reference": inputs held out from calibration with the fp32 model's logits on them
#: (`fedge.edge.agreement`).
MODEL_KINDS = ("onnx", "onnx-weights", "onnx-adapter", "tensorrt")
KINDS = (*MODEL_KINDS, "reference")
WEIGHTS_KIND, ADAPTER_KIND = "onnx-weights", "onnx-adapter"
#: updates: applied to the very model a device serves (`base_version`, `base_sha256`), yielding `target_sha256`
UPDATE_KINDS = (WEIGHTS_KIND, ADAPTER_KIND)
PRECISIONS = ("int8", "fp16", "fp32")  # smallest first: the order devices try them in
REFERENCE = "reference"  # the reference set's format name in a version
_UPDATE_KEYS = ("base_version", "base_sha256", "target_sha256")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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


def format_name(precision: str, kind: str = "onnx", device_class: str = "") -> str:
    """A model format's name in a version: its precision ("int8"), or for an engine plan "tensorrt-int8-<device class>"."""
    if kind != "tensorrt":
        return precision
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", device_class).strip("-")
    return f"tensorrt-{precision}-{slug}"[:100]


@dataclass(frozen=True)
class ArtifactFile:
    """One format of a version: what kind of file it is, its identity (sha256, size), what was measured on it."""

    kind: str
    sha256: str
    bytes: int
    precision: str = ""  # of a model file: int8, fp16 or fp32
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_model(self) -> bool:
        return self.kind in MODEL_KINDS

    @property
    def is_update(self) -> bool:
        return self.kind in UPDATE_KINDS

    @property
    def model_sha256(self) -> str:
        """The sha256 of the whole model this file yields (for an update: after applying it)."""
        return str(self.metadata["target_sha256"]) if self.is_update else self.sha256

    def check(self, name: str) -> None:
        if not _NAME.match(name):
            raise ArtifactError(f"format name {name!r} is not a plain name")
        if self.kind not in KINDS:
            raise ArtifactError(f"{name}: unknown kind of file {self.kind!r}; known: {KINDS}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ArtifactError(f"{name}: sha256 is not a 64-hex digest")
        if self.bytes < 0:
            raise ArtifactError(f"{name}: negative size")
        if self.is_model and self.precision not in PRECISIONS:
            raise ArtifactError(f"{name}: a model's precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.is_update and any(k not in self.metadata for k in _UPDATE_KEYS):
            what = "a weight-only update" if self.kind == WEIGHTS_KIND else "an adapter update"
            raise ArtifactError(f"{name}: {what} needs {_UPDATE_KEYS} in its metadata")
        if self.kind == "tensorrt" and not self.metadata.get("device_class"):
            raise ArtifactError(f"{name}: an engine plan must say which device class it was built for")


@dataclass(frozen=True)
class BundleFile:
    """A file to publish: its bytes and what it is (the registry computes its sha256 and size)."""

    data: builtins.bytes
    kind: str = "onnx"
    precision: str = "fp32"
    metadata: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> ArtifactFile:
        precision = self.precision if self.kind in MODEL_KINDS else ""
        return ArtifactFile(self.kind, sha256_hex(self.data), len(self.data), precision, dict(self.metadata))


@dataclass(frozen=True)
class Manifest:
    """What a signature covers: one version, every format of it (files that share the version), provenance."""

    version: int
    formats: dict[str, ArtifactFile]
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
                formats={str(name): ArtifactFile(kind=str(f["kind"]), sha256=str(f["sha256"]), bytes=int(f["bytes"]),
                                               precision=str(f.get("precision", "")),
                                               metadata=dict(f.get("metadata", {})))
                       for name, f in dict(raw["formats"]).items()},
                created_unix=float(raw.get("created_unix", 0.0)),
                metadata=dict(raw.get("metadata", {})),
                schema=int(raw.get("schema", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"malformed manifest: {err!r}") from err
        if manifest.schema != MANIFEST_SCHEMA:
            raise ArtifactError(f"unsupported manifest schema {manifest.schema} (this agent reads {MANIFEST_SCHEMA})")
        if not manifest.formats:
            raise ArtifactError("a version needs at least one format")
        for name, entry in manifest.formats.items():
            entry.check(name)
        if not manifest.models():
            raise ArtifactError("a version needs at least one model")
        return manifest

    def models(self) -> dict[str, ArtifactFile]:
        """The servable formats (whole models, weight-only updates, engine plans), by name."""
        return {name: f for name, f in self.formats.items() if f.is_model}

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.formats.values())


def make_manifest(version: int, files: dict[str, BundleFile], metadata: dict[str, Any] | None = None) -> Manifest:
    """The manifest of a new version (raises ArtifactError for what an agent would refuse)."""
    manifest = Manifest(version=version, formats={name: f.describe() for name, f in files.items()},
                        created_unix=time.time(), metadata=dict(metadata or {}))
    return Manifest.parse(manifest.canonical())  # the checks every agent applies


# ---- a version before it is published: a folder ---------------------------------------------------------------

BUNDLE_INDEX = "bundle.json"
_DEFAULT_FILENAMES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx",
                      "fp32-unmerged": "model.unmerged.onnx", REFERENCE: "reference.safetensors"}


def write_bundle(folder: Path, formats: Mapping[str, BundleFile], metadata: dict[str, Any] | None = None) -> Path:
    """Write a publishable version: each format's file (model.onnx, model.int8.onnx, ...) and `bundle.json` naming
    them; `fedge registry publish FOLDER` and `fedge registry serve --publish FOLDER` read it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"metadata": dict(metadata or {}), "formats": {}}
    for name, f in formats.items():
        filename = _DEFAULT_FILENAMES.get(name, f"{name}.bin")
        (folder / filename).write_bytes(f.data)
        index["formats"][name] = {"file": filename, "kind": f.kind, "precision": f.precision, "metadata": f.metadata}
    path = folder / BUNDLE_INDEX
    path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return path


def read_bundle(path: Path) -> tuple[dict[str, BundleFile], dict[str, Any]]:
    """(formats, metadata) of a version folder written by `write_bundle`, or of one ONNX file (published as fp32)."""
    path = Path(path)
    if path.is_file():
        return {"fp32": BundleFile(path.read_bytes(), "onnx", "fp32")}, {"source": path.name}
    try:
        index = json.loads((path / BUNDLE_INDEX).read_text())
        formats = {str(name): BundleFile((path / Path(str(f["file"])).name).read_bytes(), str(f["kind"]),
                                         str(f.get("precision", "")), dict(f.get("metadata", {})))
                   for name, f in dict(index["formats"]).items()}
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path} is neither an ONNX file nor a version folder with {BUNDLE_INDEX}: {err}") from err
    return formats, {**dict(index.get("metadata", {})), "source": path.name}


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


def verify_file(data: bytes, manifest: Manifest, name: str) -> None:
    """Check a downloaded file's size and sha256 against its entry in the signed manifest."""
    entry = manifest.formats[name]
    if len(data) != entry.bytes:
        raise ArtifactError(f"v{manifest.version} {name} is {len(data)} bytes, manifest says {entry.bytes}")
    digest = sha256_hex(data)
    if digest != entry.sha256:
        raise ArtifactError(f"v{manifest.version} {name} sha256 {digest[:12]}... != manifest {entry.sha256[:12]}...")


def verify_model(data: bytes, manifest: Manifest, name: str) -> None:
    """Check whole model bytes against what the manifest says they must hash to (also after a weight update)."""
    digest, expected = sha256_hex(data), manifest.formats[name].model_sha256
    if digest != expected:
        raise ArtifactError(f"v{manifest.version} {name} model hashes to {digest[:12]}..., manifest says {expected[:12]}...")


# ---- on disk ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoredArtifact:
    """One version on disk: its manifest, the exact signed bytes and signature, and its folder."""

    manifest: Manifest
    canonical: builtins.bytes
    signature: builtins.bytes
    folder: Path

    def path(self, name: str) -> Path:
        """Where the file `name` of this version is (it may be absent: a device keeps only what it serves)."""
        if name not in self.manifest.formats:
            raise KeyError(f"v{self.manifest.version} has no file {name!r}; it has {sorted(self.manifest.formats)}")
        return self.folder / f"{name}{ArtifactStore.SUFFIX}"

    def has(self, name: str) -> bool:
        return name in self.manifest.formats and self.path(name).exists()


class ArtifactStore:
    """Versions as folders `ROOT/v000001/` (manifest.json, manifest.sig, and `<name>.bin` per file held).

    A version appears only once fully written (a hidden temporary folder, then a
    rename), so a crash or a concurrent reader never sees half of one.
    """

    MANIFEST, SIGNATURE, SUFFIX = "manifest.json", "manifest.sig", ".bin"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit())

    def write(self, manifest: Manifest, canonical: builtins.bytes, signature: builtins.bytes,
              files: Mapping[str, builtins.bytes]) -> StoredArtifact:
        """Store a version with the given files (all, or those a device keeps), replacing a leftover of the same
        number; `canonical` and `signature` as received."""
        unknown = set(files) - set(manifest.formats)
        if unknown:
            raise ArtifactError(f"v{manifest.version} has no files {sorted(unknown)}")
        final = self.folder(manifest.version)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir()
        for name, data in files.items():
            (tmp / f"{name}{self.SUFFIX}").write_bytes(data)
        (tmp / self.MANIFEST).write_bytes(canonical)
        (tmp / self.SIGNATURE).write_bytes(signature)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return StoredArtifact(manifest, canonical, signature, final)

    def read(self, version: int, key: Ed25519PublicKey | None = None) -> StoredArtifact:
        """A stored version; with `key`, its manifest must verify against it (what a device trusts after a restart)."""
        folder = self.folder(version)
        canonical = (folder / self.MANIFEST).read_bytes()
        signature = (folder / self.SIGNATURE).read_bytes()
        manifest = verify_manifest(canonical, signature, key) if key is not None else Manifest.parse(canonical)
        return StoredArtifact(manifest, canonical, signature, folder)

    def remove(self, version: int) -> None:
        shutil.rmtree(self.folder(version), ignore_errors=True)
