"""Where the kept entries of a sparse update are: per-tensor counts plus one entropy-coded gap stream."""

from __future__ import annotations

import numpy as np

from fedge.codecs.base import CodecError, TensorSpec
from fedge.codecs.primitives.entropy import decode_gaps, encode_gaps, shannon_bytes
from fedge.codecs.primitives.frame import PayloadReader, PayloadWriter
from fedge.codecs.primitives.select import gaps_of, indices_of, keep_count


def write_positions(writer: PayloadWriter, indices: list[np.ndarray]) -> None:
    """Two sections: uint32 kept count per tensor, and the gaps of all tensors in one coded stream.

    One stream (one fitted model) for all tensors keeps the model's cost paid once,
    which matters for the many small tensors of an adapter.
    """
    counts = np.array([i.size for i in indices], dtype="<u4")
    gaps = np.concatenate([gaps_of(i) for i in indices]) if indices else np.zeros(0, np.int64)
    writer.add("counts", counts)
    writer.add("positions", encode_gaps(gaps), entropy_coded=True, bound=lambda: shannon_bytes(gaps))


def read_positions(reader: PayloadReader, specs: list[TensorSpec], *, per_tensor: float | None = None,
                   overall: float | None = None) -> list[np.ndarray]:
    """Kept indices per tensor; the counts are checked against the selection rule the sender had to follow
    (`per_tensor` fraction of every tensor, or `overall` fraction of all entries), so a payload
    that does not belong to these specs is refused."""
    counts = reader.array("counts", "<u4", len(specs)).astype(np.int64)
    sizes = np.array([s.size for s in specs], dtype=np.int64)
    if (counts > sizes).any():
        raise CodecError("a tensor's kept count exceeds its size")
    if per_tensor is not None:
        want = np.array([keep_count(int(n), per_tensor) for n in sizes], dtype=np.int64)
        if not np.array_equal(counts, want):
            raise CodecError(f"kept counts {counts.tolist()[:5]} do not match a {per_tensor} fraction of the specs")
    if overall is not None and int(counts.sum()) != keep_count(int(sizes.sum()), overall):
        raise CodecError(f"{int(counts.sum())} kept entries do not match a {overall} fraction of the specs")
    gaps = decode_gaps(reader.take("positions"), int(counts.sum()))
    out = []
    start = 0
    for spec, count in zip(specs, counts.tolist(), strict=True):
        idx = indices_of(gaps[start:start + count])
        start += count
        if count and idx[-1] >= spec.size:
            raise CodecError(f"positions of {spec.name!r} run past its {spec.size} entries")
        out.append(idx)
    return out
