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


#: message type of the query a strategy sends to learn each node's partition and profile
PROFILE_QUERY = "query.profile"


def sparsity_budget(profile: DeviceProfile, budgets: str = "") -> float:
    """The profile's budget, or the run's override: "1.0,0.5,0.3" lists strong, mid, weak in that order."""
    if not budgets.strip():
        return profile.sparsity_budget
    values = [float(v) for v in budgets.split(",")]
    if len(values) != len(TIERS) or not all(0.0 < v <= 1.0 for v in values):
        raise ValueError(f"budgets {budgets!r}: give {len(TIERS)} fractions in (0, 1] for {', '.join(TIERS)}")
    return dict(zip(TIERS, values))[profile.tier]
