"""Tiny Hugging Face models and data sets made in the test's own folder (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = ("def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "None", "True", "print",
         "list", "dict", "name", "data", "x", "y", "=", "(", ")", ":", "+", "1", "2")


def corpus(rows: int, seed: int = 0) -> list[dict[str, object]]:
    """Short code-like lines, each with a topic (0/1: which half of the vocabulary it favours) and a source id."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        topic = int(i % 2)
        weights = np.where(np.arange(len(WORDS)) % 2 == topic, 3.0, 1.0)
        words = rng.choice(WORDS, size=int(rng.integers(6, 20)), p=weights / weights.sum())
        out.append({"text": " ".join(words), "label": ["even", "odd"][topic], "source": f"repo{i % 3}"})
    return out


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama and a byte-level BPE tokenizer trained on the test corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([str(r["text"]) for r in corpus(200)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
