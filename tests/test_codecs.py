"""Codec round trips, size accounts, entropy bounds and compression sanity."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedge.codecs import CodecError, available_codecs, build_codec, entropy_report, known_codecs
from fedge.codecs.primitives.entropy import decode_gaps, decode_symbols, encode_gaps, encode_symbols, shannon_bytes
from fedge.codecs.primitives.kmeans import kmeans_1d
from fedge.codecs.primitives.select import gaps_of, indices_of, keep_count, kth_largest, topk_indices

ALL = ["dense", "fedzip", "flasc", "ternary", "q8", "q4"]


def make_update(seed: int = 0, scale: float = 1e-3) -> OrderedDict[str, np.ndarray]:
    """Adapter-like shapes, heavy-tailed values, one tiny and one odd-sized tensor."""
    rng = np.random.default_rng(seed)
    shapes = {"conv.lora_A.weight": (16, 8, 3, 3), "conv.lora_B.weight": (32, 16, 1, 1),
              "fc.lora_A.weight": (16, 1000), "fc.lora_B.weight": (129, 16), "bias": (7,), "scalar": ()}
    return OrderedDict((k, (rng.standard_t(3, s) * scale).astype(np.float32)) for k, s in shapes.items())


def test_registry_lists_every_codec_with_a_version() -> None:
    assert sorted(ALL) == available_codecs()
    assert all(v >= 1 for v in known_codecs().values())
    with pytest.raises(ValueError, match="unknown codec"):
        build_codec("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        build_codec("fedzip", zz=1)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_keeps_names_shapes_dtypes_and_accounts_every_byte(name: str) -> None:
    update = make_update()
    codec = build_codec(name)
    encoded = codec.encode(update)
    decoded = codec.decode(encoded.payload, encoded.specs)
    assert list(decoded) == list(update)
    for k, v in update.items():
        assert decoded[k].shape == v.shape and decoded[k].dtype == v.dtype
        assert np.isfinite(decoded[k]).all()
    assert encoded.accounted_bytes() == len(encoded.payload)
    # params survive the string form the envelope carries
    again = build_codec(name, **codec.params())
    assert again.params() == codec.params()
    redecoded = again.decode(encoded.payload, encoded.specs)
    assert all(np.array_equal(redecoded[k], decoded[k]) for k in update)


@pytest.mark.parametrize("name", ALL)
def test_entropy_bound_never_exceeds_coded_size(name: str) -> None:
    encoded = build_codec(name).encode(make_update(1))
    report = entropy_report(encoded)
    for section in report["sections"]:
        assert section["bound_bytes"] <= section["bytes"], section
    assert report["bound_bytes"] <= report["bytes"]


def test_dense_is_exact_and_raw_size() -> None:
    update = make_update()
    codec = build_codec("dense")
    encoded = codec.encode(update)
    assert len(encoded.payload) == encoded.raw_bytes()
    decoded = codec.decode(encoded.payload, encoded.specs)
    assert all(np.array_equal(decoded[k], update[k]) for k in update)


def test_fedzip_keeps_top_z_per_tensor_with_three_levels() -> None:
    update = make_update()
    codec = build_codec("fedzip", z=0.2)
    encoded = codec.encode(update)
    decoded = codec.decode(encoded.payload, encoded.specs)
    for k, v in update.items():
        flat, out = v.reshape(-1), decoded[k].reshape(-1)
        kept = np.flatnonzero(out)
        k_expected = keep_count(flat.size, 0.2)
        assert kept.size <= k_expected  # a centroid may land on exactly 0
        top = set(topk_indices(np.abs(flat), k_expected).tolist())
        assert set(kept.tolist()) <= top
        assert np.unique(out[kept]).size <= 3
    assert encoded.raw_bytes() / encoded.nbytes > 15


def test_flasc_selects_globally_and_keeps_values_exact() -> None:
    update = make_update()
    update["fc.lora_B.weight"] *= 100  # one tensor dominates: a global budget must go there
    codec = build_codec("flasc", density=1 / 16)
    encoded = codec.encode(update)
    decoded = codec.decode(encoded.payload, encoded.specs)
    total = sum(v.size for v in update.values())
    kept = {k: np.flatnonzero(decoded[k]) for k in update}
    assert sum(i.size for i in kept.values()) == keep_count(total, 1 / 16)
    assert kept["fc.lora_B.weight"].size == keep_count(total, 1 / 16)
    for k, idx in kept.items():
        assert np.array_equal(decoded[k].reshape(-1)[idx], update[k].reshape(-1)[idx])
    fp16 = build_codec("flasc", density=1 / 16, value_dtype="float16").encode(update)
    assert fp16.nbytes < encoded.nbytes


def test_ternary_values_are_minus_s_zero_plus_s() -> None:
    update = make_update()
    for scale in ("l2", "std"):
        codec = build_codec("ternary", k=0.2, scale=scale, alpha=2.0)
        encoded = codec.encode(update)
        decoded = codec.decode(encoded.payload, encoded.specs)
        for k, v in update.items():
            out = decoded[k].reshape(-1)
            levels = np.unique(np.abs(out[out != 0]))
            assert levels.size <= 1
            kept = np.flatnonzero(out)
            if scale == "l2" or v.std() > 0:  # a one-entry tensor has std 0, so the std rule zeroes it
                assert kept.size == keep_count(v.size, 0.2)
            assert np.array_equal(np.sign(out[kept]), np.sign(v.reshape(-1)[kept]))
            if scale == "l2" and kept.size:
                assert np.isclose(levels[0], np.abs(v.reshape(-1)[kept]).mean(), rtol=1e-5)
            if scale == "std" and kept.size:
                assert np.isclose(levels[0], 2.0 * v.std(), rtol=1e-5)


@pytest.mark.parametrize(("name", "bits", "target"), [("q8", 8, 0.266), ("q4", 4, 0.141)])
def test_blockwise_error_is_within_half_a_step_per_block(name: str, bits: int, target: float) -> None:
    update = make_update()
    codec = build_codec(name, block=64)
    encoded = codec.encode(update)
    decoded = codec.decode(encoded.payload, encoded.specs)
    qmax = (1 << (bits - 1)) - 1
    for k, v in update.items():
        flat = v.reshape(-1)
        pad = (-flat.size) % 64
        blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, 64)
        step = np.abs(blocks).max(axis=1) / qmax
        err = np.abs(np.concatenate([decoded[k].reshape(-1), np.zeros(pad, np.float32)]).reshape(-1, 64) - blocks)
        assert (err <= step[:, None] * 0.5 * (1 + 1e-5) + 1e-12).all()
    assert encoded.nbytes / encoded.raw_bytes() == pytest.approx(target, abs=0.01)


def test_compression_ratios_are_sane() -> None:
    update = make_update(3)
    encoded = {n: build_codec(n).encode(update) for n in ALL}
    ratio = {n: e.raw_bytes() / e.nbytes for n, e in encoded.items()}
    assert ratio["dense"] == 1.0
    assert 3.5 < ratio["q8"] < 4.0 and 6.5 < ratio["q4"] < 7.5
    assert ratio["fedzip"] > ratio["flasc"] / 2 > 1 and ratio["ternary"] > 15


def test_corrupt_payloads_raise_codec_errors() -> None:
    update = make_update()
    for name in ALL:
        codec = build_codec(name)
        encoded = codec.encode(update)
        with pytest.raises(CodecError):
            codec.decode(encoded.payload[:-5], encoded.specs)
        with pytest.raises(CodecError):
            codec.decode(encoded.payload + b"\0\0\0\0", encoded.specs)


def test_entropy_coder_is_lossless_and_near_the_bound() -> None:
    rng = np.random.default_rng(0)
    symbols = rng.choice(3, size=50_000, p=[0.45, 0.1, 0.45])
    blob = encode_symbols(symbols)
    assert np.array_equal(decode_symbols(blob, symbols.size), symbols)
    assert shannon_bytes(symbols) <= len(blob) <= 1.02 * shannon_bytes(symbols)
    constant = np.full(10, 4)
    assert np.array_equal(decode_symbols(encode_symbols(constant), 10), constant)
    for density in (0.2, 1 / 16, 0.01):
        idx = np.flatnonzero(rng.random(400_000) < density)
        gaps = gaps_of(idx)
        blob = encode_gaps(gaps)
        assert np.array_equal(indices_of(decode_gaps(blob, gaps.size)), idx)
        assert shannon_bytes(gaps) <= len(blob) <= 1.10 * shannon_bytes(gaps)
    huge = np.array([0, 15, 16, 17, 1 << 20, (1 << 35) + 12345, 3], dtype=np.int64)
    assert np.array_equal(decode_gaps(encode_gaps(huge), huge.size), huge)
    with pytest.raises(CodecError):
        decode_symbols(blob, 7)


def test_topk_is_exact_with_ties() -> None:
    m = np.array([3, 1, 2, 2, 2, 0, 5], np.float32)
    assert topk_indices(m, 2).tolist() == [0, 6]
    assert topk_indices(m, 4).tolist() == [0, 2, 3, 6]
    assert topk_indices(m, 0).size == 0 and topk_indices(m, 9).size == 7
    rng = np.random.default_rng(11)
    big = {"heavy": np.abs(rng.standard_t(3, 100_000)), "ties": rng.integers(0, 5, 100_000),
           "sorted": np.sort(np.abs(rng.standard_normal(100_000))), "zeros": np.zeros(100_000)}
    for values in big.values():
        values = values.astype(np.float32)
        for k in (1, 6_250, 20_000, 99_999):
            assert kth_largest(values, k) == np.sort(values)[::-1][k - 1]
            idx = topk_indices(values, k)
            assert idx.size == k and np.all(np.diff(idx) > 0)


def test_kmeans_matches_plain_lloyd() -> None:
    rng = np.random.default_rng(5)
    v = (rng.standard_t(3, 5000) * 1e-3).astype(np.float32)
    centroids, ids = kmeans_1d(v, 3, 5)
    c = np.linspace(v.min(), v.max(), 3).astype(np.float64)
    for _ in range(5):
        a = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        c = np.array([v[a == j].mean() if (a == j).any() else c[j] for j in range(3)])
    assert np.all(np.diff(centroids) >= 0)
    for j in range(3):
        if (ids == j).any():
            assert centroids[j] == pytest.approx(v[ids == j].mean(), rel=1e-4)
    assert np.abs(centroids - c).max() < 1e-3 * np.abs(c).max() + 1e-9
