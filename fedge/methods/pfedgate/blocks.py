"""Parameter blocks: each tensor of a shared state split into a few contiguous blocks.

pFedGate scores, selects, uploads and averages the shared model block by block.
Client and server derive the same layout from the state they both hold (names,
shapes, split count), so a block is named on the wire by its position alone:
an upload is the flat values of the selected blocks plus a packed bit mask.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

#: reply record of a block upload and its two arrays
UPLOAD_RECORD = "blocks"
BLOCK_VALUES = "block-values"
BLOCK_MASK = "block-mask"
#: config key that tells a held-out node it is joining at the end (gate-only training, no upload)
PHASE_KEY = "pfedgate-phase"
NOVEL_PHASE = "novel"


@dataclass(frozen=True)
class Block:
    tensor: str
    #: position of the block inside its tensor (0 is the tensor's first block)
    index: int
    #: element range in the flattened tensor
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of a named state, in state order then element order."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    blocks: tuple[Block, ...]

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]], splits: int) -> BlockLayout:
        """Split every tensor into `splits` near-equal contiguous blocks of whole rows (fewer when it has fewer rows).

        A row is one output unit (a linear layer's output feature, a conv's output
        channel, a bias entry), so a block gates whole units: the classifier's rows
        become per-class blocks a client can amplify or damp for its own labels.
        """
        if splits < 1:
            raise ValueError("splits must be >= 1")
        blocks: list[Block] = []
        for name, shape in shapes.items():
            numel = int(np.prod(shape, dtype=np.int64))
            if numel == 0:
                continue
            rows = int(shape[0]) if len(shape) > 1 else numel
            edges = np.linspace(0, rows, min(splits, rows) + 1).round().astype(np.int64) * (numel // rows)
            blocks.extend(Block(name, i, int(a), int(b)) for i, (a, b) in enumerate(pairwise(edges)))
        return cls(tuple((k, tuple(int(d) for d in s)) for k, s in shapes.items()), tuple(blocks))

    @classmethod
    def of_state(cls, state: Mapping[str, np.ndarray], splits: int) -> BlockLayout:
        return cls.of({k: v.shape for k, v in state.items()}, splits)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([b.size for b in self.blocks], dtype=np.int64)

    @property
    def first(self) -> np.ndarray:
        """True for the first block of each tensor (always kept, so no tensor vanishes from a personal model)."""
        return np.array([b.index == 0 for b in self.blocks], dtype=bool)

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def blocks_of(self, name: str) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.tensor == name]

    # ---- wire form ----------------------------------------------------------------
    def pack(self, state: Mapping[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat float32 values of the selected blocks and the selection as packed bits."""
        mask = self._check_mask(mask)
        flat = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in state.items()}
        parts = [flat[b.tensor][b.start:b.stop] for b, keep in zip(self.blocks, mask) if keep]
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return values.astype(np.float32, copy=False), np.packbits(mask)

    def unpack(self, values: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The selection mask and, per selected block, its values; rejects a size mismatch."""
        mask = np.unpackbits(np.asarray(bits, dtype=np.uint8), count=len(self.blocks)).astype(bool)
        expected = int(self.sizes[mask].sum())
        if values.ndim != 1 or values.size != expected:
            raise ValueError(f"block upload holds {values.size} values, its mask selects {expected}")
        cuts = np.cumsum(self.sizes[mask])[:-1]
        return mask, list(np.split(np.asarray(values, dtype=np.float32), cuts))

    def _check_mask(self, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self.blocks),):
            raise ValueError(f"mask has shape {mask.shape}, layout has {len(self.blocks)} blocks")
        return mask


@dataclass(frozen=True)
class BlockUpload:
    """One client's selected blocks, as the server decodes them."""

    mask: np.ndarray
    values: list[np.ndarray]
    weight: float


def block_average(layout: BlockLayout, previous: Mapping[str, np.ndarray],
                  uploads: Sequence[BlockUpload]) -> OrderedDict[str, np.ndarray]:
    """Per block, the weighted mean over the clients that sent it; the previous value where nobody did."""
    flat = OrderedDict((k, np.asarray(v, dtype=np.float64).reshape(-1).copy()) for k, v in previous.items())
    sums = {k: np.zeros_like(v) for k, v in flat.items()}
    weights = np.zeros(len(layout), dtype=np.float64)
    for up in uploads:
        selected = np.flatnonzero(up.mask)
        for block_id, values in zip(selected, up.values):
            b = layout.blocks[block_id]
            sums[b.tensor][b.start:b.stop] += up.weight * values
            weights[block_id] += up.weight
    for block_id in np.flatnonzero(weights > 0):
        b = layout.blocks[block_id]
        flat[b.tensor][b.start:b.stop] = sums[b.tensor][b.start:b.stop] / weights[block_id]
    return OrderedDict((k, flat[k].reshape(np.shape(previous[k])).astype(np.float32)) for k in flat)
