"""The codec benchmark runs end to end on a small synthetic update and reports consistent rows."""

from __future__ import annotations

import io

from rich.console import Console

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

    # The tables fit a 140-column terminal whole: every header and every cell, nothing cut to an ellipsis.
    rows = [dict(r, update="random-t3:10000000") for r in rows]  # the longest label `fedge bench codecs` prints
    console = Console(width=140, record=True, file=io.StringIO())
    print_codec_bench(rows, console=console)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 140
    for header in ("update", "codec", "params", "bytes", "ratio", "coded/bound", "ec/bound", "rel L2 err", "enc MB/s",
                   "dec MB/s", "enc x memcpy", "dec x memcpy", "memcpy MB/s"):
        assert header in text, header
    for r in rows:
        assert " ".join(f"{k}={v}" for k, v in r["params"].items()) in text and f"{r['coded_bytes']:,}" in text


def test_random_update_has_the_requested_size() -> None:
    update = random_update(100_003, tensors=8)
    assert sum(v.size for v in update.values()) == 100_003 and len(update) == 8
    assert all(v.ndim == 2 for v in update.values())
