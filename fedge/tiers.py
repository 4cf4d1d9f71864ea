"""Device tiers: what a client's hardware can afford (sparsity budget, compute, bandwidth).

A scenario gives each partition a tier; a node with its own data may name one in
its node config. pFedGate sizes a client's sparse model by its tier's budget,
and the edge bench models a weak device's downlink with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceTier:
    """A resource tier. `sparsity_budget` is the fraction of the shared model a client may hold and send
    (pFedGate's s); the bandwidths price a transfer on such a device."""

    tier: str
    sparsity_budget: float
    compute_gflops: float
    uplink_mbps: float
    downlink_mbps: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


TIERS: dict[str, DeviceTier] = {
    "strong": DeviceTier("strong", 1.0, 200.0, 50.0, 200.0),
    "mid": DeviceTier("mid", 0.5, 50.0, 10.0, 50.0),
    "weak": DeviceTier("weak", 0.3, 10.0, 2.0, 10.0),
}


def tier_for(partition_id: int, tiers: tuple[str, ...] = ("strong", "mid", "weak")) -> DeviceTier:
    """Round-robin tier assignment: every scenario gets a mix of strong, mid and weak devices."""
    return TIERS[tiers[partition_id % len(tiers)]]


def tier_named(name: str) -> DeviceTier:
    try:
        return TIERS[name]
    except KeyError as err:
        raise ValueError(f"tier {name!r} is not one of {sorted(TIERS)}") from err


def sparsity_budget(tier: DeviceTier, budgets: str = "") -> float:
    """The tier's budget, or the run's override: "1.0,0.5,0.3" lists strong, mid, weak in that order."""
    if not budgets.strip():
        return tier.sparsity_budget
    values = [float(v) for v in budgets.split(",")]
    if len(values) != len(TIERS) or not all(0.0 < v <= 1.0 for v in values):
        raise ValueError(f"budgets {budgets!r}: give {len(TIERS)} fractions in (0, 1] for {', '.join(TIERS)}")
    return dict(zip(TIERS, values))[tier.tier]
