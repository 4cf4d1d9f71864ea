"""Coded size next to the Shannon bound, per section and in total."""

from __future__ import annotations

from typing import Any

from fedge.codecs.base import Encoded


def entropy_report(encoded: Encoded) -> dict[str, Any]:
    """Per-section bytes and bound, and totals.

    The bound of an entropy-coded section is the zeroth-order empirical entropy
    of the symbols it carries (the least any static code could spend on them);
    raw sections (values, scales, counts) count as their own size; fixed-width
    codes (q8/q4) report the entropy of their codes, showing what an entropy
    coder would still save. Framing (4 bytes a section) is counted as overhead.
    """
    bounds = [s.bound_bytes() for s in encoded.sections]
    sections = [{"name": s.name, "bytes": s.nbytes, "bound_bytes": b, "entropy_coded": s.entropy_coded}
                for s, b in zip(encoded.sections, bounds, strict=True)]
    total_bound = sum(bounds)
    return {
        "bytes": encoded.nbytes,
        "bound_bytes": total_bound,
        "coded_over_bound": encoded.nbytes / total_bound if total_bound else 1.0,
        "entropy_coded_bytes": sum(s.nbytes for s in encoded.sections if s.entropy_coded),
        "entropy_coded_bound_bytes": sum(b for s, b in zip(encoded.sections, bounds, strict=True) if s.entropy_coded),
        "sections": sections,
    }
