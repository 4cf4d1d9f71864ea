"""Damaged uploads are refused with a reason; a federation with a damaging client still completes."""

import json

import numpy as np
import pytest

from fedge.client.faults import FAULT_KINDS, damage
from fedge.codecs import build_codec
from fedge.envelope import EnvelopeError, decode_update, encode_update, expected_specs

EXPECTED_REASON = {"truncate": None, "corrupt": "checksum", "version": "codec-version", "shape": "spec-mismatch",
                   "nan": "non-finite", "oversize": "too-large"}


def _update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"m.lora_A.weight": rng.normal(size=(16, 64)).astype(np.float32),
            "m.lora_B.weight": rng.normal(size=(32, 16)).astype(np.float32)}


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_every_damaged_envelope_is_refused_with_its_reason(kind):
    update = _update()
    envelope, _ = encode_update(update, build_codec("fedzip"))
    decode_update(envelope, expected_specs(update), 1 << 20)  # the undamaged one is accepted
    with pytest.raises(EnvelopeError) as caught:
        decode_update(damage(envelope, kind), expected_specs(update), 1 << 20)
    if EXPECTED_REASON[kind] is not None:
        assert caught.value.reason == EXPECTED_REASON[kind], str(caught.value)


@pytest.mark.slow
def test_federation_with_a_damaging_client_completes_and_stays_finite(tmp_path):
    from fedge.sim.runner import simulate

    outcome = simulate({"method": "fedzip", "num-server-rounds": 2, "num-clients": 3, "local-epochs": 1,
                        "fault-partitions": "0", "fault-kind": "corrupt", "out-dir": str(tmp_path)})
    rows = json.loads((tmp_path / "results.json").read_text())["methods"]["fedzip"]["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["accepted"] == 2 and r["rejected"] == 1 for r in rows)
    from fedge.state import from_record

    final = from_record(outcome.arrays)
    assert all(np.isfinite(v).all() for v in final.values())
    assert outcome.final["accuracy"] > outcome.base.accuracy
