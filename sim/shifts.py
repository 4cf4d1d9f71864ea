"""Per-device domain shift: each client sees the world through its own camera."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: how far one take of a camera's angle strays from its mounting angle
ROTATION_JITTER_DEG = 4.0


@dataclass(frozen=True)
class CameraShift:
    rotation_deg: float
    blur_sigma: float
    noise_std: float
    contrast: float

    @classmethod
    def draw(cls, rng: np.random.Generator, strength: float = 1.0) -> CameraShift:
        # Cameras mounted alike (same tilt direction), each at its own angle.
        return cls(
            rotation_deg=float(rng.uniform(25.0, 50.0) * strength),
            blur_sigma=float(rng.uniform(0.5, 1.5) * strength),
            noise_std=float(rng.uniform(0.05, 0.2) * strength),
            contrast=float(1.0 - rng.uniform(0.2, 0.5) * strength),
        )

    def jittered(self, rng: np.random.Generator) -> CameraShift:
        """The same camera on another take: its angle, focus and exposure vary a little (fresh noise comes from `apply`)."""
        return CameraShift(
            rotation_deg=self.rotation_deg + float(rng.uniform(-ROTATION_JITTER_DEG, ROTATION_JITTER_DEG)),
            blur_sigma=self.blur_sigma * float(rng.uniform(0.8, 1.2)),
            noise_std=self.noise_std,
            contrast=float(np.clip(self.contrast + rng.uniform(-0.05, 0.05), 0.1, 1.0)),
        )

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """images: (N, H, W) in [0, 1]; returns float32 (N, H, W)."""
        from scipy import ndimage  # here, not at import: a node reading its cached shard never needs SciPy

        out = ndimage.rotate(images, self.rotation_deg, axes=(1, 2), reshape=False, order=1, mode="constant")
        out = ndimage.gaussian_filter(out, sigma=(0, self.blur_sigma, self.blur_sigma))
        out = (out - 0.5) * self.contrast + 0.5
        out = out + rng.normal(0.0, self.noise_std, size=out.shape)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)
