"""Device profiles: what a client's hardware can afford, per resource tier."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceProfile:
    """A resource tier.

    `sparsity_budget` is the fraction of the shared model a client may hold and
    send (pFedGate's s); compute and bandwidth feed the network/latency model.
    """

    tier: str
    sparsity_budget: float
    compute_gflops: float
    uplink_mbps: float
    downlink_mbps: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


TIERS: dict[str, DeviceProfile] = {
    "strong": DeviceProfile("strong", 1.0, 200.0, 50.0, 200.0),
    "mid": DeviceProfile("mid", 0.5, 50.0, 10.0, 50.0),
    "weak": DeviceProfile("weak", 0.3, 10.0, 2.0, 10.0),
}


def tier_for(partition_id: int, tiers: tuple[str, ...] = ("strong", "mid", "weak")) -> DeviceProfile:
    """Round-robin tier assignment: every scenario gets a mix of strong, mid and weak devices."""
    return TIERS[tiers[partition_id % len(tiers)]]
