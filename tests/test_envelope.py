"""Envelope round trips and every rejection a receiver must make, each with its reason."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

from fedge.codecs import build_codec
from fedge.envelope import EnvelopeError, decode_update, encode_update, expected_specs, pack, peek
from fedge.protos import envelope_pb2

LIMIT = 1 << 22


def make_update(seed: int = 0) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict([("a.lora_A.weight", (rng.standard_normal((16, 300)) * 1e-3).astype(np.float32)),
                        ("a.lora_B.weight", (rng.standard_normal((40, 16)) * 1e-3).astype(np.float32))])


def reject(data: bytes, reason: str, expected: dict | None = None, max_bytes: int = LIMIT,
           **kw: Any) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        decode_update(data, expected, max_bytes, **kw)
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, ValueError) and reason in str(info.value)
    return info.value


def edit(data: bytes, **changes: object) -> bytes:
    """Re-serialize an envelope with some fields changed (checksum kept unless asked)."""
    msg = envelope_pb2.UpdateEnvelope.FromString(data)
    for key, value in changes.items():
        if key == "tensors":
            del msg.tensors[:]
            msg.tensors.extend(value)  # type: ignore[arg-type]
        elif key == "codec_params":
            msg.codec_params.clear()
            msg.codec_params.update(value)  # type: ignore[arg-type]
        else:
            setattr(msg, key, value)
    return msg.SerializeToString()


@pytest.mark.parametrize("name", ["dense", "fedzip", "flasc", "ternary", "q8", "q4"])
def test_receiver_reconstructs_what_the_sender_saw(name: str) -> None:
    update = make_update()
    data, decoded = encode_update(update, build_codec(name))
    received = decode_update(data, expected_specs(update), LIMIT)
    assert list(received) == list(update)
    assert all(np.array_equal(received[k], decoded[k]) for k in update)
    info = peek(data, LIMIT)
    assert info.codec == name and info.raw_bytes == 4 * sum(v.size for v in update.values())
    assert decode_update(data, None, LIMIT).keys() == update.keys()


def test_residual_is_what_the_codec_dropped() -> None:
    update = make_update()
    _, decoded = encode_update(update, build_codec("fedzip"))
    residual = {k: update[k] - decoded[k] for k in update}
    assert all(np.allclose(decoded[k] + residual[k], update[k]) for k in update)
    assert any(np.abs(r).sum() > 0 for r in residual.values())


def test_rejects_truncated_and_garbage_bytes() -> None:
    data, _ = encode_update(make_update(), build_codec("fedzip"))
    reject(data[: len(data) // 2], "unparseable")
    reject(b"\xff" * 64, "unparseable")
    # a cut that lands on a field boundary parses, but without its checksum or payload it cannot pass
    with pytest.raises(EnvelopeError) as info:
        decode_update(data[:12], None, LIMIT)
    assert info.value.reason in {"unparseable", "checksum", "format"}


def test_rejects_checksum_mismatch() -> None:
    data, _ = encode_update(make_update(), build_codec("ternary"))
    msg = envelope_pb2.UpdateEnvelope.FromString(data)
    flipped = bytearray(msg.payload)
    flipped[len(flipped) // 2] ^= 0x01
    reject(edit(data, payload=bytes(flipped)), "checksum")


def test_rejects_unknown_codec_and_wrong_version() -> None:
    data, _ = encode_update(make_update(), build_codec("q8"))
    reject(edit(data, codec="zipzap"), "unknown-codec")
    reject(edit(data, codec_version=99), "codec-version")
    reject(data, "unknown-codec", known_codecs={"fedzip": 1})
    reject(data, "codec-version", known_codecs={"q8": 2})
    reject(edit(data, codec="zipzap"), "unknown-codec", known_codecs={"zipzap": 1})


def test_rejects_specs_that_do_not_match_expected() -> None:
    update = make_update()
    data, _ = encode_update(update, build_codec("flasc"))
    expected = expected_specs(update)
    wrong_shape = dict(expected, **{"a.lora_B.weight": ((16, 40), "float32")})
    reject(data, "spec-mismatch", wrong_shape)
    wrong_dtype = dict(expected, **{"a.lora_B.weight": ((40, 16), "float16")})
    reject(data, "spec-mismatch", wrong_dtype)
    reject(data, "spec-mismatch", dict(expected, **{"c.lora_A.weight": ((2,), "float32")}))
    reject(data, "spec-mismatch", {"a.lora_A.weight": expected["a.lora_A.weight"]})
    bad = [envelope_pb2.TensorSpec(name="x", shape=[2], dtype="int64")]
    reject(edit(data, tensors=bad), "bad-specs")


def test_rejects_non_finite_values() -> None:
    update = make_update()
    update["a.lora_A.weight"][3, 7] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_update(update, build_codec("dense"))
    data, _ = encode_update(update, build_codec("dense"), check_finite=False)
    reject(data, "non-finite", expected_specs(update))
    update = make_update()
    update["a.lora_B.weight"][0, 0] = np.inf
    data, _ = encode_update(update, build_codec("flasc"), check_finite=False)
    reject(data, "non-finite", expected_specs(update))


def test_rejects_oversized_envelopes() -> None:
    data, _ = encode_update(make_update(), build_codec("dense"))
    err = reject(data, "too-large", max_bytes=len(data) - 1)
    assert str(len(data)) in str(err)


def test_rejects_payload_inconsistent_with_specs() -> None:
    update = make_update()
    for name in ("dense", "fedzip", "q4"):
        data, _ = encode_update(update, build_codec(name))
        payload = envelope_pb2.UpdateEnvelope.FromString(data).payload
        short = payload[:-4]
        reject(edit(data, payload=short, payload_sha256=hashlib.sha256(short).digest()), "bad-payload")
        # specs claiming a bigger tensor than the payload carries
        bigger = [envelope_pb2.TensorSpec(name=k, shape=[v.shape[0] * 2, *v.shape[1:]], dtype="float32")
                  for k, v in update.items()]
        reject(edit(data, tensors=bigger), "bad-payload")


def test_rejects_bad_codec_params() -> None:
    data, _ = encode_update(make_update(), build_codec("fedzip"))
    reject(edit(data, codec_params={"z": "lots"}), "bad-params")
    reject(edit(data, codec_params={"unknown": "1"}), "bad-params")


def test_specs_without_expected_are_capped() -> None:
    update = make_update()
    codec = build_codec("fedzip")
    encoded = codec.encode(update)
    data = pack(codec, encoded.payload, encoded.specs)
    reject(data, "bad-specs", max_elements=100)
    huge = [envelope_pb2.TensorSpec(name="w", shape=[1 << 40, 1 << 40], dtype="float32")]
    reject(edit(data, tensors=huge), "bad-specs")


@pytest.mark.parametrize("name", ["dense", "fedzip", "flasc", "ternary", "q8", "q4"])
def test_corrupted_payloads_with_valid_checksums_never_escape_as_other_errors(name: str) -> None:
    """A sender with a bug (or worse) can checksum garbage: the receiver must still answer with EnvelopeError."""
    update = make_update(2)
    data, _ = encode_update(update, build_codec(name))
    payload = envelope_pb2.UpdateEnvelope.FromString(data).payload
    rng = np.random.default_rng(7)
    expected = expected_specs(update)
    for _ in range(40):
        corrupt = bytearray(payload)
        for pos in rng.integers(0, len(corrupt), size=rng.integers(1, 4)):
            corrupt[pos] = int(rng.integers(0, 256))
        forged = edit(data, payload=bytes(corrupt), payload_sha256=hashlib.sha256(bytes(corrupt)).digest())
        try:
            out = decode_update(forged, expected, LIMIT)
        except EnvelopeError as err:
            assert err.reason in {"bad-payload", "non-finite"}
        else:
            assert all(np.isfinite(v).all() and v.shape == update[k].shape for k, v in out.items())
