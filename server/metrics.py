"""Reading numbers out of Flower's MetricRecords, whose values may also be lists."""

from __future__ import annotations

from flwr.app.typing import MetricRecordValues


def scalar(value: MetricRecordValues) -> float:
    """A metric that must be one number."""
    if isinstance(value, list):
        raise TypeError(f"expected a number, got a list of {len(value)}")
    return float(value)
