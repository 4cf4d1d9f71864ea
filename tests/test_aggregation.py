import numpy as np
import pytest

from fedge.methods.plain import product_gap
from fedge.results import ClientEval, fleet_accuracy


def _lora(rng, a_scale=1.0):
    return {"m.lora_A.weight": rng.normal(size=(4, 12)).astype(np.float32) * a_scale,
            "m.lora_B.weight": rng.normal(size=(6, 4)).astype(np.float32)}


def test_product_gap_is_zero_when_a_is_shared():
    rng = np.random.default_rng(0)
    prev = _lora(rng)
    clients = [{**prev, "m.lora_B.weight": rng.normal(size=(6, 4)).astype(np.float32)} for _ in range(3)]
    assert product_gap(prev, clients, [1, 2, 3]) == pytest.approx(0.0, abs=1e-6)


def test_product_gap_is_positive_when_a_and_b_both_move():
    rng = np.random.default_rng(1)
    prev = _lora(rng)
    clients = [_lora(rng) for _ in range(3)]
    assert product_gap(prev, clients, [1, 1, 1]) > 0.05


def test_fleet_accuracy_arithmetic():
    evals = [ClientEval(i, n, c, p) for i, (n, c, p) in enumerate(
        [(10, 5, 9), (30, 30, 30), (20, 10, 4), (40, 20, 20), (10, 1, 1), (10, 9, 9), (10, 9, 9), (10, 9, 9),
         (10, 9, 9), (10, 9, 9), (10, 9, 9)])]
    fleet = fleet_accuracy(evals)
    n = sum(e.num_examples for e in evals)
    assert fleet.accuracy == pytest.approx(sum(e.correct for e in evals) / n)
    assert fleet.personalized_accuracy == pytest.approx(sum(e.personal_correct for e in evals) / n)
    # 11 clients -> the worst ceil(1.1) = 2: 0.1 and 0.2
    assert fleet.bottom_decile_accuracy == pytest.approx((0.1 + 0.2) / 2)


def test_fedavg_weighted_mean_matches_flower():
    """The stock strategy the baselines use averages by num-examples; check its arithmetic on our records."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedge.state import from_record, to_record

    a = {"w": np.full(3, 1.0, np.float32)}
    b = {"w": np.full(3, 4.0, np.float32)}
    records = [RecordDict({"arrays": to_record(s), "metrics": MetricRecord({"num-examples": n})}) for s, n in ((a, 1), (b, 2))]
    agg = from_record(aggregate_arrayrecords(records, "num-examples"))
    np.testing.assert_allclose(agg["w"], np.full(3, 3.0))


def test_plot_series_add_personalized_accuracy_only_where_it_differs(tmp_path):
    from fedge.results import accuracy_series, plot_accuracy_vs_uplink

    rounds = lambda accs, pers: [{"uplink_bytes": 2_000_000, "accuracy": a, "personalized_accuracy": p}
                                 for a, p in zip(accs, pers)]
    results = {"base": {"accuracy": 0.3}, "methods": {
        "lora-fedavg": {"rounds": rounds([0.5, 0.7], [0.5, 0.7])},
        "pfedgate": {"rounds": rounds([0.4, 0.6], [0.8, 0.9])},
    }}
    series = accuracy_series(results)
    assert [s.label for s in series] == ["lora-fedavg", "pfedgate", "pfedgate (personalized)"]
    assert series[2].uplink_mb == [2.0, 4.0] and series[2].accuracy == [0.8, 0.9]
    assert plot_accuracy_vs_uplink(results, tmp_path / "plot.png").stat().st_size > 0


# ---- the streaming decode-and-aggregate path -------------------------------------------------------------------

STREAM_CODECS = {"dense": {}, "fedzip": {"z": 0.2}, "flasc": {"density": 0.1}, "ternary": {"k": 0.2},
                 "q8": {"block": 64}, "q4": {"block": 32}}


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": rng.standard_t(3, size=(16, 70)).astype(np.float32),  # 70: a partial q8 block
            "a.lora_B.weight": rng.standard_t(3, size=(40, 16)).astype(np.float32),
            "b.bias": rng.standard_t(3, size=(5,)).astype(np.float32)}


@pytest.mark.parametrize("codec", sorted(STREAM_CODECS))
def test_streaming_mean_equals_the_weighted_mean_of_decoded_updates(codec):
    from fedge.aggregation import StreamingMean
    from fedge.codecs import build_codec
    from fedge.envelope import decode_update, encode_update, expected_specs

    updates = [_update(s) for s in range(4)]
    weights = [3.0, 10.0, 1.0, 7.0]
    envelopes = [encode_update(u, build_codec(codec, **STREAM_CODECS[codec]))[0] for u in updates]
    running = StreamingMean(updates[0], 1 << 20)
    for envelope, w in zip(envelopes, weights, strict=True):
        running.add(envelope, w)
    decoded = [decode_update(e, expected_specs(updates[0]), 1 << 20) for e in envelopes]
    mean = running.mean()
    assert running.accepted == 4 and running.envelope_bytes == sum(map(len, envelopes))
    for k in updates[0]:
        want = sum(w * d[k].astype(np.float64) for w, d in zip(weights, decoded, strict=True)) / sum(weights)
        assert mean[k].shape == updates[0][k].shape and mean[k].dtype == np.float32
        np.testing.assert_allclose(mean[k], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["corrupt", "nan", "shape", "truncate"])
def test_a_refused_envelope_leaves_the_running_mean_untouched(kind):
    from fedge.aggregation import StreamingMean
    from fedge.client.faults import damage
    from fedge.codecs import build_codec
    from fedge.envelope import EnvelopeError, encode_update

    good, _ = encode_update(_update(0), build_codec("fedzip"))
    bad, _ = encode_update(_update(1), build_codec("fedzip"))
    running = StreamingMean(_update(0), 1 << 20)
    running.add(good, 2.0)
    before = {k: v.copy() for k, v in running.mean().items()}
    with pytest.raises(EnvelopeError):
        running.add(damage(bad, kind), 5.0)
    with pytest.raises(ValueError, match="positive"):
        running.add(bad, float("nan"))
    assert running.accepted == 1
    assert all(np.array_equal(before[k], v) for k, v in running.mean().items())


def test_an_infinity_inside_a_compact_payload_is_refused_as_non_finite():
    """Sparse and block codecs add from their compact values; an infinity there is caught before it is added."""
    from fedge.aggregation import StreamingMean
    from fedge.codecs import build_codec
    from fedge.envelope import EnvelopeError, encode_update

    update = _update(0)
    poisoned = {k: v.copy() for k, v in update.items()}
    poisoned["a.lora_A.weight"][0, 0] = np.inf  # the largest entry: every sparse codec keeps it
    for codec in ("flasc", "q8", "fedzip"):
        envelope, _ = encode_update(poisoned, build_codec(codec), check_finite=False)
        with pytest.raises(EnvelopeError) as caught:
            StreamingMean(update, 1 << 20).add(envelope, 1.0)
        assert caught.value.reason == "non-finite"


def test_streaming_memory_does_not_grow_with_the_number_of_clients():
    """O(P): what is allocated at once while averaging 8 or 64 envelopes is the same."""
    import tracemalloc

    from fedge.aggregation import StreamingMean
    from fedge.codecs import build_codec
    from fedge.envelope import encode_update

    update = {"w": np.random.default_rng(0).normal(size=200_000).astype(np.float32)}
    envelope, _ = encode_update(update, build_codec("q8"))

    def peak(clients: int) -> int:
        tracemalloc.start()
        running = StreamingMean(update, 1 << 24)
        for _ in range(clients):
            running.add(bytes(memoryview(envelope)), 1.0)  # a fresh copy per reply, as from the wire
        running.mean()
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak_bytes

    small, large = peak(8), peak(64)
    assert large < 1.2 * small, (small, large)  # holding 64 decoded updates would need ~8x more
    assert small < 8 * update["w"].nbytes  # a float64 sum, one envelope and its decoding: a few times the update


def test_compressed_fedavg_agrees_with_flowers_fedavg_on_dense_updates(run_identity):
    """The same updates, averaged by fedge's streaming path (dense envelopes) and by Flower's stock FedAvg."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from fedge.codecs import build_codec
    from fedge.envelope import encode_update
    from fedge.messages import ARRAYS_RECORD, METRICS_RECORD, UPDATE_RECORD, envelope_record
    from fedge.methods.compressed import CompressedFedAvg
    from fedge.state import from_record, to_record

    updates = [_update(s) for s in range(3)]
    weights = [4, 1, 9]
    request = Message(RecordDict(), dst_node_id=1, message_type="train")

    def reply(record_name, record, w):
        return Message(RecordDict({record_name: record, METRICS_RECORD: MetricRecord({"num-examples": w})}),
                       reply_to=request)

    ours = CompressedFedAvg(max_update_bytes=1 << 20)
    ours.round_start = {k: np.zeros_like(v) for k, v in updates[0].items()}
    dense = build_codec("dense")
    got, _ = ours.aggregate_train(1, [reply(UPDATE_RECORD, envelope_record(encode_update(u, dense)[0]), w)
                                      for u, w in zip(updates, weights, strict=True)])
    flower, _ = FedAvg().aggregate_train(1, [reply(ARRAYS_RECORD, to_record(u), w)
                                             for u, w in zip(updates, weights, strict=True)])
    got, flower = from_record(got), from_record(flower)
    for k in updates[0]:
        np.testing.assert_allclose(got[k], flower[k], rtol=1e-5, atol=1e-6)
