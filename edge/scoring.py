"""What a device's inputs are and what its model's outputs are scored on: classifiers and causal language models.

A classifier takes a float batch of feature tensors and gives one row of class
logits per input. A causal LM takes token ids and their attention mask and gives
logits for every position; it is scored on its next-token predictions, one row
per real (unpadded) token, labelled by the token that follows, so a device
measures its LM's next-token accuracy without labels of its own.

On a device a token batch travels as one int64 array of shape (batch, 2,
sequence), ids and mask stacked, so everything that slices, replays or
canaries a batch of inputs handles both kinds unchanged; `feeds` turns a batch
into the named inputs of the ONNX graph. Torch-free: the agent uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: the inputs of an exported causal LM (`fedge.edge.export.causal_lm_to_onnx`), in order
TOKEN_INPUTS = ("input_ids", "attention_mask")


def pack_tokens(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Ids and mask as one (batch, 2, sequence) int64 batch."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be (batch, sequence) alike")
    return np.stack([ids, mask], axis=1).astype(np.int64)


def is_token_batch(x: np.ndarray) -> bool:
    return x.ndim == 3 and x.shape[1] == 2 and np.issubdtype(x.dtype, np.integer)


def unpack_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not is_token_batch(x):
        raise ValueError(f"a token batch is int64 (batch, 2, sequence), not {x.dtype}{list(x.shape)}")
    return np.ascontiguousarray(x[:, 0]), np.ascontiguousarray(x[:, 1])


def feeds(input_names: Sequence[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's named inputs for a batch: a token batch for an LM's (input_ids, attention_mask), else floats."""
    if tuple(input_names) == TOKEN_INPUTS:
        ids, mask = unpack_tokens(x)
        return {TOKEN_INPUTS[0]: ids, TOKEN_INPUTS[1]: mask}
    if len(input_names) != 1:
        raise ValueError(f"a model with inputs {list(input_names)} is neither a classifier nor a causal LM")
    if is_token_batch(x):
        raise ValueError("token inputs given to a model of feature tensors")
    return {input_names[0]: np.ascontiguousarray(x, dtype=np.float32)}


def scored(x: np.ndarray, logits: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows of logits that count as predictions, their labels or None).

    Classifier: each input's logits, labelled by `y` where given. Causal LM: the logits at every position whose next
    token is real, labelled by that token.
    """
    if logits.ndim == 2:
        if len(logits) != len(x):
            raise ValueError(f"{len(logits)} rows of logits for {len(x)} inputs")
        return logits, y
    if logits.ndim == 3:
        ids, mask = unpack_tokens(x)
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"logits {list(logits.shape)} for token batch {list(ids.shape)}")
        real = mask[:, 1:].astype(bool)  # as training counts them (`fedge.training.next_token_targets`)
        return logits[:, :-1][real], ids[:, 1:][real]
    raise ValueError(f"logits of shape {list(logits.shape)}: neither a classifier's nor a causal LM's")
