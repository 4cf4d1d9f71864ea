"""Entropy coding of symbol streams with constriction's ANS coder, and their Shannon bound.

A stream is coded with one static categorical model fitted to its own
histogram; the histogram travels with the stream as varint counts, so the
decoder rebuilds the identical model and knows the stream's length. Large integers (position gaps) are split
into a log-scale bucket, coded with the fitted model, plus the bits below the
bucket's top, coded uniformly: an Elias-gamma-like scheme whose buckets are
fine enough (4 per octave) to stay close to the empirical entropy.

Layout of a stream: varint alphabet | varint counts[alphabet] | uint32 ANS words.
"""

from __future__ import annotations

import constriction
import numpy as np

from fedge.codecs.base import CodecError
from fedge.codecs.primitives.varint import decode_varints, encode_varints

_MAX_ALPHABET = 1 << 16
_EXACT_BITS = 4
_EXACT = 1 << _EXACT_BITS  # gaps below this are their own bucket
_PER_OCTAVE_BITS = 2  # 4 buckets per octave above _EXACT; below _EXACT_BITS, so every bucket has low bits
_MAX_GAP_BITS = 40


def shannon_bytes(symbols: np.ndarray) -> float:
    """Zeroth-order empirical entropy of a stream, in bytes: the least any static code can spend on it."""
    flat = np.asarray(symbols).reshape(-1)
    n = flat.size
    if n == 0:
        return 0.0
    if flat.min() >= 0 and flat.max() < 4 * n + 4096:
        counts = np.bincount(flat.astype(np.int64))
        counts = counts[counts > 0]
    else:
        counts = np.unique(flat, return_counts=True)[1]
    counts = counts.astype(np.float64)
    return float((counts * (np.log2(n) - np.log2(counts))).sum() / 8.0)


def _counts(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    return np.bincount(symbols, minlength=alphabet).astype(np.int64)


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _pack(counts: np.ndarray, coder: constriction.stream.stack.AnsCoder) -> bytes:
    words = coder.get_compressed().astype("<u4", copy=False)
    return encode_varints(np.array([counts.size])) + encode_varints(counts) + words.tobytes()


def _unpack(data: bytes | memoryview, count: int) -> tuple[np.ndarray, constriction.stream.stack.AnsCoder]:
    head, used = decode_varints(data, 1)
    alphabet = int(head[0])
    if not 2 <= alphabet <= _MAX_ALPHABET:
        raise CodecError(f"entropy-coded stream announces an alphabet of {alphabet} symbols")
    counts, table = decode_varints(memoryview(data)[used:], alphabet)
    table_end = used + table
    if (len(data) - table_end) % 4:
        raise CodecError("entropy-coded stream does not end on a whole ANS word")
    if int(counts.sum()) != count:
        raise CodecError(f"entropy-coded stream holds {int(counts.sum())} symbols, expected {count}")
    words = np.frombuffer(data, dtype="<u4", offset=table_end).astype(np.uint32)
    return counts, constriction.stream.stack.AnsCoder(words)


def _finish(coder: constriction.stream.stack.AnsCoder) -> None:
    if not coder.is_empty():
        raise CodecError("entropy-coded stream has data left after its last symbol (corrupt)")


def encode_symbols(symbols: np.ndarray) -> bytes:
    """Code non-negative integer symbols (alphabet < 65536) with a model fitted to their histogram."""
    sym = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    alphabet = max(2, int(sym.max()) + 1 if sym.size else 2)
    if alphabet > _MAX_ALPHABET or (sym.size and sym.min() < 0):
        raise ValueError(f"symbols must lie in [0, {_MAX_ALPHABET})")
    counts = _counts(sym, alphabet)
    coder = constriction.stream.stack.AnsCoder()
    if sym.size:
        coder.encode_reverse(sym, _model(counts))
    return _pack(counts, coder)


def decode_symbols(data: bytes | memoryview, count: int) -> np.ndarray:
    counts, coder = _unpack(data, count)
    try:
        out = coder.decode(_model(counts), count) if count else np.zeros(0, np.int32)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # constriction reports invalid streams as errors or (Rust) panics
        raise CodecError(f"entropy-coded stream is corrupt: {err}") from err
    _finish(coder)
    return np.asarray(out, dtype=np.int32)


def _split_gaps(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buckets (symbols) and, for the gaps above _EXACT, their low bits and bit counts."""
    sym = gaps.astype(np.int32)  # values >= _EXACT are overwritten below
    big = gaps >= _EXACT
    gb = gaps[big]
    exp = (np.frexp(gb.astype(np.float64))[1] - 1).astype(np.int64)  # floor(log2 g), exact below 2**53
    nbits = exp - _PER_OCTAVE_BITS
    top = (gb >> nbits) & ((1 << _PER_OCTAVE_BITS) - 1)
    sym[big] = (_EXACT + ((exp - _EXACT_BITS) << _PER_OCTAVE_BITS) + top).astype(np.int32)
    low = gb & ((np.int64(1) << nbits) - 1)
    return sym, low, nbits


def _low_parts(nbits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Low bits go as a <=16-bit part and, above 16 bits, a high part (constriction's uniform model is < 2**24)."""
    lo_bits = np.minimum(nbits, 16)
    return lo_bits, nbits - lo_bits


def encode_gaps(gaps: np.ndarray) -> bytes:
    """Code non-negative integers of any size (position gaps): fitted buckets plus uniform low bits."""
    g = np.ascontiguousarray(gaps, dtype=np.int64).reshape(-1)
    if g.size and (g.min() < 0 or g.max() >= (1 << _MAX_GAP_BITS)):
        raise ValueError(f"gaps must lie in [0, 2**{_MAX_GAP_BITS})")
    sym, low, nbits = _split_gaps(g)
    alphabet = max(2, int(sym.max()) + 1 if sym.size else 2)
    counts = _counts(sym, alphabet)
    coder = constriction.stream.stack.AnsCoder()
    uniform = constriction.stream.model.Uniform()
    lo_bits, hi_bits = _low_parts(nbits)
    has_hi = hi_bits > 0
    if has_hi.any():
        coder.encode_reverse((low[has_hi] >> 16).astype(np.int32), uniform,
                             (np.int64(1) << hi_bits[has_hi]).astype(np.int32))
    if low.size:
        coder.encode_reverse((low & 0xFFFF).astype(np.int32), uniform, (np.int64(1) << lo_bits).astype(np.int32))
    if sym.size:
        coder.encode_reverse(sym, _model(counts))
    return _pack(counts, coder)


def decode_gaps(data: bytes | memoryview, count: int) -> np.ndarray:
    counts, coder = _unpack(data, count)
    uniform = constriction.stream.model.Uniform()
    try:
        gaps = np.asarray(coder.decode(_model(counts), count), dtype=np.int64) if count else np.zeros(0, np.int64)
        big = gaps >= _EXACT  # below _EXACT a symbol is its gap; above, its bucket, replaced at the end
        rank = gaps[big] - _EXACT
        exp = (rank >> _PER_OCTAVE_BITS) + _EXACT_BITS
        top = rank & ((1 << _PER_OCTAVE_BITS) - 1)
        nbits = exp - _PER_OCTAVE_BITS
        if nbits.size and nbits.max() > _MAX_GAP_BITS:
            raise CodecError("position stream decodes to a gap beyond the supported range")
        lo_bits, hi_bits = _low_parts(nbits)
        low = np.zeros(nbits.size, np.int64)
        if low.size:
            low = np.asarray(coder.decode(uniform, (np.int64(1) << lo_bits).astype(np.int32)), dtype=np.int64)
        has_hi = hi_bits > 0
        if has_hi.any():
            hi = np.asarray(coder.decode(uniform, (np.int64(1) << hi_bits[has_hi]).astype(np.int32)), dtype=np.int64)
            low[has_hi] |= hi << 16
    except (CodecError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # constriction reports invalid streams as errors or (Rust) panics
        raise CodecError(f"position stream is corrupt: {err}") from err
    _finish(coder)
    gaps[big] = (((1 << _PER_OCTAVE_BITS) | top) << nbits) | low
    return gaps
