"""FLASC's sparse download: the top-k (density d_down) of the global adapter's change from its shared seeded init.

Both sides can rebuild the init (same seed), so only the largest changes travel;
the client's starting point is init + those changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from fedge.codecs.registry import build_codec
from fedge.envelope import decode_update, encode_update, expected_specs
from fedge.state import add, subtract

DOWNLOAD_RECORD = "download"


def encode_download(global_state: Mapping[str, np.ndarray], init: Mapping[str, np.ndarray], density: float) -> bytes:
    envelope, _ = encode_update(subtract(dict(global_state), dict(init)), build_codec("flasc", density=density))
    return envelope


def decode_download(envelope: bytes, init: Mapping[str, np.ndarray], max_bytes: int) -> OrderedDict[str, np.ndarray]:
    change = decode_update(envelope, expected_specs(init), max_bytes)
    return add(dict(init), change)
