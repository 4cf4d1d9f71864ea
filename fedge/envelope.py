"""The update envelope: one self-checking protobuf message per compressed update.

The sender wraps a codec's payload with what the receiver needs to judge it
before trusting it (codec id and version, tensor specs, sha256, size). The
receiver rejects anything malformed with an `EnvelopeError` whose `reason` is
a short machine-readable code, so a strategy can drop one client's update and
carry on with the round.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from fedge.codecs import Codec, TensorSpec, available_codecs, build_codec, specs_of
from fedge.codecs import known_codecs as registry_codecs
from fedge.codecs.base import SUPPORTED_DTYPES, Accumulating, NonFiniteError
from fedge.protos import envelope_pb2

ENVELOPE_FORMAT = 1
#: without `expected` specs, a receiver decodes at most this many entries (a 1 GiB fp32 update)
DEFAULT_MAX_ELEMENTS = 1 << 28

Expected = Mapping[str, tuple[tuple[int, ...], str]]


class EnvelopeError(ValueError):
    """A rejected envelope. `reason` is one of: too-large, unparseable, format, checksum,
    unknown-codec, codec-version, bad-specs, spec-mismatch, bad-params, bad-payload, non-finite."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EnvelopeInfo:
    codec: str
    codec_version: int
    codec_params: dict[str, str]
    specs: list[TensorSpec]
    payload_bytes: int
    raw_bytes: int


def expected_specs(reference: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The `expected` argument of `decode_update`, taken from a state the receiver already holds."""
    return {s.name: (s.shape, s.dtype) for s in specs_of(reference)}


def pack(codec: Codec, payload: bytes, specs: list[TensorSpec]) -> bytes:
    """Serialize a codec's payload and specs into an envelope."""
    msg = envelope_pb2.UpdateEnvelope(
        format=ENVELOPE_FORMAT,
        codec=codec.name,
        codec_version=codec.version,
        codec_params=codec.params(),
        tensors=[envelope_pb2.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in specs],
        payload=payload,
        payload_sha256=hashlib.sha256(payload).digest(),
        raw_bytes=4 * sum(s.size for s in specs),
    )
    return msg.SerializeToString()


def encode_update(update: Mapping[str, np.ndarray], codec: Codec, *,
                  check_finite: bool = True) -> tuple[bytes, OrderedDict[str, np.ndarray]]:
    """The serialized envelope and the update exactly as the receiver will reconstruct it.

    The reconstruction comes from the codec's own decoder, so a sender's error
    feedback (residual = update - decoded) sees precisely what was lost. A
    non-finite update is refused here (ValueError), where its cause is visible,
    rather than at the receiver.
    """
    if check_finite:
        bad = [name for name, arr in update.items() if not np.isfinite(arr).all()]
        if bad:
            raise ValueError(f"update has NaN or infinite values in {bad[:5]}")
    encoded = codec.encode(update)
    decoded = codec.decode(encoded.payload, encoded.specs)
    return pack(codec, encoded.payload, encoded.specs), decoded


def _parse(data: bytes, max_bytes: int) -> envelope_pb2.UpdateEnvelope:
    if not isinstance(data, bytes):
        data = bytes(data)  # bytearray / memoryview from a transport
    if len(data) > max_bytes:
        raise EnvelopeError("too-large", f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    msg = envelope_pb2.UpdateEnvelope()
    try:
        msg.ParseFromString(data)
    except DecodeError as err:
        raise EnvelopeError("unparseable", f"not a valid envelope ({err})") from err
    if msg.format != ENVELOPE_FORMAT:
        raise EnvelopeError("format", f"envelope format {msg.format}, this build reads {ENVELOPE_FORMAT}")
    if len(msg.payload) > max_bytes:
        raise EnvelopeError("too-large", f"payload of {len(msg.payload)} bytes exceeds the limit of {max_bytes}")
    return msg


def _specs(msg: envelope_pb2.UpdateEnvelope) -> list[TensorSpec]:
    specs, seen = [], set()
    for t in msg.tensors:
        if not t.name or t.name in seen:
            raise EnvelopeError("bad-specs", f"tensor name {t.name!r} is empty or repeated")
        if t.dtype not in SUPPORTED_DTYPES:
            raise EnvelopeError("bad-specs", f"tensor {t.name!r} has unsupported dtype {t.dtype!r}")
        if any(d < 0 for d in t.shape):
            raise EnvelopeError("bad-specs", f"tensor {t.name!r} has a negative dimension {list(t.shape)}")
        seen.add(t.name)
        specs.append(TensorSpec(t.name, tuple(int(d) for d in t.shape), t.dtype))
    return specs


def _open(data: bytes, max_bytes: int) -> tuple[envelope_pb2.UpdateEnvelope, EnvelopeInfo]:
    msg = _parse(data, max_bytes)
    if hashlib.sha256(msg.payload).digest() != msg.payload_sha256:
        raise EnvelopeError("checksum", "payload sha256 does not match the envelope's checksum")
    info = EnvelopeInfo(msg.codec, msg.codec_version, dict(msg.codec_params), _specs(msg), len(msg.payload),
                        msg.raw_bytes)
    return msg, info


def peek(data: bytes, max_bytes: int) -> EnvelopeInfo:
    """Parse and checksum an envelope without decoding its payload (for logs and byte accounting)."""
    return _open(data, max_bytes)[1]


def _check_expected(specs: list[TensorSpec], expected: Expected) -> None:
    got = {s.name for s in specs}
    missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
    if missing or extra:
        raise EnvelopeError("spec-mismatch", f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for s in specs:
        shape, dtype = expected[s.name]
        if tuple(int(d) for d in shape) != s.shape or np.dtype(dtype).name != s.dtype:
            raise EnvelopeError("spec-mismatch", f"tensor {s.name!r} is {s.shape} {s.dtype}, "
                                                 f"expected {tuple(shape)} {dtype}")


def _checked(data: bytes, expected: Expected | None, max_bytes: int, known_codecs: Mapping[str, int] | None,
             max_elements: int) -> tuple[Codec, bytes, list[TensorSpec]]:
    """Everything a receiver checks before it lets a codec read the payload; the codec, payload and specs."""
    msg, info = _open(data, max_bytes)
    accepted = registry_codecs() if known_codecs is None else known_codecs
    if info.codec not in accepted:
        raise EnvelopeError("unknown-codec", f"codec {info.codec!r} is not accepted; known: {sorted(accepted)}")
    if info.codec_version != accepted[info.codec]:
        raise EnvelopeError("codec-version", f"codec {info.codec!r} version {info.codec_version}, "
                                             f"this receiver accepts version {accepted[info.codec]}")
    specs = info.specs
    if expected is not None:
        _check_expected(specs, expected)
    elif sum(s.size for s in specs) > max_elements:
        raise EnvelopeError("bad-specs", f"specs announce more than {max_elements} entries")
    if info.codec not in available_codecs():
        raise EnvelopeError("unknown-codec", f"codec {info.codec!r} is accepted but not built into this receiver")
    try:
        codec = build_codec(info.codec, **info.codec_params)
    except ValueError as err:
        raise EnvelopeError("bad-params", str(err)) from err
    if codec.version != info.codec_version:
        raise EnvelopeError("codec-version", f"this build's {info.codec!r} is version {codec.version}")
    return codec, msg.payload, specs


@contextmanager
def _reading(codec: Codec) -> Iterator[None]:
    """A codec's failures as envelope errors: non-finite values, or a payload that does not decode."""
    try:
        yield
    except NonFiniteError as err:
        raise EnvelopeError("non-finite", str(err)) from err
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # any failure inside a codec (native panics included) is a bad payload
        raise EnvelopeError("bad-payload", f"{codec.name} payload does not decode to its specs: {err}") from err


def _require_finite(update: Mapping[str, np.ndarray]) -> None:
    for name, arr in update.items():
        if not np.isfinite(arr).all():
            raise EnvelopeError("non-finite", f"tensor {name!r} decodes to NaN or infinite values")


def decode_update(
    data: bytes,
    expected: Expected | None,
    max_bytes: int,
    known_codecs: Mapping[str, int] | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> OrderedDict[str, np.ndarray]:
    """Validate and decode an envelope; raise `EnvelopeError` for anything the receiver should not trust.

    `expected` maps each tensor name to (shape, dtype) as the receiver holds it;
    the result follows its order. `known_codecs` maps codec names to the one
    version accepted (default: every codec this build has).
    """
    codec, payload, specs = _checked(data, expected, max_bytes, known_codecs, max_elements)
    with _reading(codec):
        decoded = codec.decode(payload, specs)
    _require_finite(decoded)
    if expected is not None:
        decoded = OrderedDict((name, decoded[name]) for name in expected)
    return decoded


def accumulate_update(
    data: bytes,
    expected: Expected,
    max_bytes: int,
    into: Mapping[str, np.ndarray],
    weight: float,
    known_codecs: Mapping[str, int] | None = None,
) -> None:
    """Validate an envelope and add `weight` times its update to `into` (a flat float64 vector per tensor name).

    The same checks as `decode_update`; a codec that can (`codecs.base.Accumulating`) adds its payload
    without building the dense update. A refused envelope leaves `into` untouched.
    """
    codec, payload, specs = _checked(data, expected, max_bytes, known_codecs, DEFAULT_MAX_ELEMENTS)
    targets = [into[s.name] for s in specs]
    if isinstance(codec, Accumulating):
        with _reading(codec):
            codec.accumulate(payload, specs, targets, weight)
        return
    with _reading(codec):
        decoded = codec.decode(payload, specs)
    _require_finite(decoded)
    for target, spec in zip(targets, specs, strict=True):
        target += weight * np.asarray(decoded[spec.name], np.float32).reshape(-1)
