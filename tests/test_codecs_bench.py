"""The codec benchmark runs end to end on a small synthetic update and reports consistent rows."""

from __future__ import annotations

from fedge.codecs import available_codecs
from fedge.sim.bench_codecs import print_codec_bench, random_update, run_codec_bench


def test_bench_rows_are_complete_and_consistent() -> None:
    rows = run_codec_bench(random_params=50_000, lora=False, repeats=1)
    assert [r["codec"] for r in rows] == available_codecs()
    for r in rows:
        assert r["size_account_exact"] and r["receiver_matches_sender"]
        assert r["ratio"] == r["raw_bytes"] / r["coded_bytes"]
        assert r["bound_bytes"] <= r["coded_bytes"]
        assert r["encode_mbps"] > 0 and r["decode_mbps"] > 0 and r["memcpy_mbps"] > 0
        assert r["envelope_bytes"] > r["coded_bytes"]
    by = {r["codec"]: r for r in rows}
    assert by["dense"]["ratio"] == 1.0 and by["dense"]["rel_l2_error"] == 0.0
    assert by["fedzip"]["entropy_coded_over_bound"] < 1.1
    print_codec_bench(rows)


def test_random_update_has_the_requested_size() -> None:
    update = random_update(100_003, tensors=8)
    assert sum(v.size for v in update.values()) == 100_003 and len(update) == 8
    assert all(v.ndim == 2 for v in update.values())
