"""What an agent keeps on disk: the models it verified, which one serves, and what it refused.

Models are kept in the registry's own layout (`ArtifactStore`, under
`WORKDIR/models/`) with the signed manifest they arrived with, but only the
format the device serves; after a restart the agent re-verifies the one
`WORKDIR/current` names ("VERSION FORMAT") before serving it, even with the
registry unreachable. Refusals (`WORKDIR/refused.txt`) are kept by content, so
a forged notice for version N never blocks the genuine N.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.atomic_file import atomic_write
from fedge.edge.artifacts import ArtifactError, ArtifactStore, Manifest, sha256_hex, verify_model


def notice_key(canonical: bytes, signature: bytes) -> str:
    """A notice that did not verify, named by its bytes: the genuine notice for the same version differs."""
    return "notice:" + sha256_hex(canonical + signature)


def artifact_key(manifest: Manifest) -> str:
    """A verified version that must not serve (no format of it passed its checks, or it failed live)."""
    return f"artifact:{manifest.version}:{sha256_hex(manifest.canonical())}"


class AgentStore:
    """The agent's folder: verified models, the `current` pointer and the refusals, each written atomically."""

    def __init__(self, workdir: Path, public_key: Ed25519PublicKey) -> None:
        self.workdir = Path(workdir)
        self.public_key = public_key
        self.models = ArtifactStore(self.workdir / "models")
        self._current = self.workdir / "current"
        self._refused_file = self.workdir / "refused.txt"
        self._refused = set(self._refused_file.read_text().split()) if self._refused_file.exists() else set()

    def is_refused(self, key: str) -> bool:
        return key in self._refused

    def refuse(self, key: str) -> None:
        self._refused.add(key)
        atomic_write(self._refused_file, "".join(f"{k}\n" for k in sorted(self._refused)).encode())

    def save(self, manifest: Manifest, canonical: bytes, signature: bytes, fmt: str, data: bytes) -> None:
        """Keep the whole model of the format this device serves with the version's signed manifest (as received),
        and make it the one to serve after a restart."""
        self.models.write(manifest, canonical, signature, {fmt: data})
        self.set_current(manifest.version, fmt)

    def set_current(self, version: int, fmt: str) -> None:
        atomic_write(self._current, f"{version} {fmt}\n".encode())

    def current(self) -> tuple[Manifest, str, bytes] | None:
        """(manifest, format, model bytes) of what `current` names, re-verified (signature, then hash); None if none.

        Raises (ArtifactError, OSError, ValueError) when what is stored does not verify.
        """
        if not self._current.exists():
            return None
        version, _, fmt = self._current.read_text().strip().partition(" ")
        stored = self.models.read(int(version), self.public_key)
        if fmt not in stored.manifest.formats:
            raise ArtifactError(f"v{version} has no format {fmt!r}")
        data = stored.path(fmt).read_bytes()
        verify_model(data, stored.manifest, fmt)
        return stored.manifest, fmt, data

    def model_bytes(self, manifest: Manifest, fmt: str) -> bytes:
        """The stored whole model of a served version, checked against its manifest (the base of a weight update)."""
        data = self.models.read(manifest.version).path(fmt).read_bytes()
        verify_model(data, manifest, fmt)
        return data

    def prune(self, keep: Iterable[int]) -> None:
        """Remove every stored model but `keep` (the serving and the last good one)."""
        kept = set(keep)
        for version in self.models.versions():
            if version not in kept:
                self.models.remove(version)
