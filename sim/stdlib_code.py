"""`stdlib-code`: the embedded causal-LM scenario. Python's own standard library is the corpus.

The text is the standard library source of the interpreter that runs fedge
(found with `sysconfig`, read at run time, never copied into the repository).
Its packages are natural non-IID domains: each client is one package or a
small group of related ones (`email`, `asyncio`, `xml`, `json`, `http`,
`multiprocessing`, `unittest`, ...), holding out whole files as its test split.
A separate set of modules (the top-level modules and the tooling packages) is
the source domain: a byte-level BPE tokenizer (Hugging Face `tokenizers`) and a
small `transformers` Llama are trained on it once, seeded, and cached in
`$FEDGE_CACHE` as a Hugging Face directory that the Auto classes load.
LoRA goes into the attention and MLP projections.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.progress import report
from fedge.scenario import ClientData
from fedge.sim.cache import build_once, cache_dir
from fedge.tiers import tier_for

#: clients, in order: one package, or a few related ones, each
CLIENT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("email",), ("asyncio",), ("xml", "xmlrpc"), ("json", "tomllib", "html"), ("http", "urllib", "wsgiref"),
    ("multiprocessing", "concurrent"), ("unittest",), ("importlib",), ("logging",), ("ctypes",),
    ("sqlite3", "dbm", "zoneinfo"), ("collections", "re"),
)
#: the source domain: every top-level module, and these packages (those the interpreter has)
SOURCE_PACKAGES = ("distutils", "lib2to3", "idlelib", "tkinter", "turtledemo", "ensurepip", "venv", "curses")
#: folders that hold tests or data rather than library code
SKIPPED_PARTS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class BaseRecipe:
    """The tokenizer and base model, and how the base is pretrained (hashed into the cache key).

    Sized for about 1.1M parameters and a few minutes of pretraining on 2 CPU cores.
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 512
    sequence: int = 128
    steps: int = 1000
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.1


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _library_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*.py") if not SKIPPED_PARTS & set(f.relative_to(folder).parts))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


class StdlibCode:
    name = "stdlib-code"
    architecture = "llama"
    task = "causal-lm"
    #: LoRA on the attention and MLP projections of every layer
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    #: each round passes over a client's sequences once: more distinct text beats more passes over less. Measured
    #: with `fedge run --scenario stdlib-code --quick` (seed 0; held-out perplexity, base 51.33): 96 sequences for 2
    #: epochs 47.40 (lora-fedavg), 192 for 2 epochs 46.02, 288 for 1 epoch 45.13 in about the same time, and
    #: fedzip 50.01, 50.15 and 47.32: a second pass over a package's few files overfits them, most of all once an
    #: update is compressed.
    local_epochs = 1

    def __init__(self, seed: int = 0, max_length: int = 128, load_in_4bit: bool = False,
                 train_sequences: int = 288, test_sequences: int = 32, test_fraction: float = 0.25,
                 recipe: BaseRecipe | None = None) -> None:
        if max_length < 8:
            raise ValueError(f"max-length {max_length} is too short for a sequence of code")
        self.seed = seed
        self.max_length = max_length
        self.load_in_4bit = load_in_4bit
        self.train_sequences = train_sequences
        self.test_sequences = test_sequences
        self.test_fraction = test_fraction
        self.recipe = recipe or BaseRecipe()
        self.num_classes = self.recipe.vocab_size
        self.sample_shape = (max_length,)

    # ---- corpus ------------------------------------------------------------------
    @cached_property
    def groups(self) -> list[tuple[str, ...]]:
        """The client groups this interpreter's standard library has (each with files to train and test on)."""
        root = stdlib_root()
        present = [tuple(p for p in g if (root / p).is_dir()) for g in CLIENT_GROUPS]
        return [g for g in present if g and sum(len(_library_files(root / p)) for p in g) >= 2]

    def source_files(self) -> list[Path]:
        root = stdlib_root()
        files = sorted(root.glob("*.py"))
        for package in SOURCE_PACKAGES:
            if (root / package).is_dir():
                files += _library_files(root / package)
        return files

    def _group_files(self, group: tuple[str, ...]) -> list[Path]:
        return [f for package in group for f in _library_files(stdlib_root() / package)]

    def _split_files(self, partition_id: int) -> tuple[list[Path], list[Path]]:
        """A client's files, split into train and held-out test files (whole files, seeded)."""
        files = self._group_files(self.groups[partition_id])
        order = np.random.default_rng([self.seed, 3, partition_id]).permutation(len(files))
        n_test = min(len(files) - 1, max(1, round(self.test_fraction * len(files))))
        return [files[i] for i in sorted(order[n_test:])], [files[i] for i in sorted(order[:n_test])]

    # ---- tokenizer and base --------------------------------------------------------
    def _cache_key(self) -> str:
        spec = {"v": 1, "python": platform.python_version(), "impl": platform.python_implementation(),
                "seed": self.seed, "recipe": asdict(self.recipe), "source": list(SOURCE_PACKAGES)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def base_dir(self) -> Path:
        """The cached Hugging Face directory (config, weights, tokenizer, pretraining report), built on first use."""
        return build_once(cache_dir() / f"{self.name}-base-{self._cache_key()}", self._build_base)

    def _build_base(self, folder: Path) -> None:
        tokenizer = train_tokenizer([_read(f) for f in self.source_files()], self.recipe.vocab_size)
        tokenizer.save_pretrained(str(folder))
        report = pretrain(folder, tokenizer, self.source_files(), self.recipe, self.seed)
        (folder / "fedge-pretraining.json").write_text(json.dumps(report, indent=2))

    def tokenizer(self) -> Any:
        return self._tokenizer

    @cached_property
    def _tokenizer(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.base_dir))

    @cached_property
    def _base(self) -> nn.Module:
        from fedge.pretrained import load_pretrained

        return load_pretrained(str(self.base_dir), "causal-lm", seed=self.seed)

    def base_model(self) -> nn.Module:
        """The pretrained source-domain Llama (trained once, cached); a 4-bit NF4 load with `load-in-4bit` (CUDA)."""
        if self.load_in_4bit:
            from fedge.pretrained import load_pretrained

            return load_pretrained(str(self.base_dir), "causal-lm", seed=self.seed, load_in_4bit=True)
        return copy.deepcopy(self._base)

    def save_base(self, directory: Path) -> str:
        """Adapters' base: a copy of the cached directory (the cache is disposable, the run's output is not)."""
        shutil.copytree(self.base_dir, directory, dirs_exist_ok=True)
        return str(directory.resolve())

    # ---- clients -------------------------------------------------------------------
    def _sequences(self, files: list[Path], limit: int, rng: np.random.Generator) -> TensorDataset:
        """The files' tokens, end-of-text between files, cut into `max_length` blocks; `limit` of them (seeded)."""
        tok = self.tokenizer()
        ids: list[int] = []
        for f in files:
            ids += tok(_read(f), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        blocks = np.asarray(ids[: len(ids) - len(ids) % self.max_length] or ids, dtype=np.int64)
        if len(blocks) < self.max_length:  # one short file: pad it and mask the padding
            padded = np.full(self.max_length, tok.pad_token_id, dtype=np.int64)
            padded[: len(blocks)] = blocks
            mask = (np.arange(self.max_length) < len(blocks)).astype(np.int64)
            return TensorDataset(torch.from_numpy(padded[None]), torch.from_numpy(mask[None]))
        blocks = blocks.reshape(-1, self.max_length)
        chosen = np.sort(rng.permutation(len(blocks))[:limit])
        x = torch.from_numpy(blocks[chosen])
        return TensorDataset(x, torch.ones_like(x))

    @cached_property
    def _clients(self) -> dict[int, ClientData]:
        return {}

    def client_data(self, partition_id: int, num_partitions: int) -> ClientData:
        """Client `partition_id`'s packages: train sequences from its train files, test ones from its held-out files.

        A client's data does not depend on how many clients there are (only on which of them it is).
        """
        if num_partitions > len(self.groups):
            raise ValueError(f"stdlib-code has {len(self.groups)} clients (stdlib package groups: "
                             f"{', '.join('+'.join(g) for g in self.groups)}); run with at most that many")
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
        if partition_id not in self._clients:
            train_files, test_files = self._split_files(partition_id)
            rng = np.random.default_rng([self.seed, 4, partition_id])
            self._clients[partition_id] = ClientData(train=self._sequences(train_files, self.train_sequences, rng),
                                                     test=self._sequences(test_files, self.test_sequences, rng),
                                                     tier=tier_for(partition_id))
        return self._clients[partition_id]

    def describe(self, num_partitions: int) -> dict[str, Any]:
        root = stdlib_root()
        report_path = self.base_dir / "fedge-pretraining.json"
        clients = []
        for p in range(min(num_partitions, len(self.groups))):
            train_files, test_files = self._split_files(p)
            data = self.client_data(p, num_partitions)
            clients.append({"partition_id": p, "packages": list(self.groups[p]), "tier": tier_for(p).tier,
                            "train_files": len(train_files), "test_files": len(test_files),
                            "train_sequences": len(data.train), "test_sequences": len(data.test),
                            "test_tokens": int(data.test.tensors[1][:, 1:].sum())})
        return {
            "name": self.name,
            "architecture": self.architecture,
            "task": self.task,
            "seed": self.seed,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "stdlib": str(root),
            "sequence_length": self.max_length,
            "source": {"packages": ["<top-level modules>", *(p for p in SOURCE_PACKAGES if (root / p).is_dir())],
                       "files": len(self.source_files())},
            "base": json.loads(report_path.read_text()) if report_path.exists() else {},
            "num_partitions": num_partitions,
            "clients": clients,
        }


# ---- building the base ---------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same texts), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def pretrain(folder: Path, tokenizer: Any, files: list[Path], recipe: BaseRecipe, seed: int) -> dict[str, Any]:
    """Pretrain a small Llama on the source files (random windows, AdamW, cosine schedule) and save it to `folder`.

    Its steps are reported as progress (`fedge.progress`: a bar where a command shows them); 2% of the tokens are held out to report the source-domain perplexity.
    One thread: the weights are the same bytes in any process on any machine, and a shared machine's other work
    does not turn a second thread's waits into spinning (measured here: 2.5 s of CPU a step with two contended
    threads, 0.3 s with one).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    from fedge.pretrained import quiet_transformers
    from fedge.training import evaluate, task_loss

    quiet_transformers()
    started = time.perf_counter()
    ids: list[int] = []
    for f in files:
        ids += tokenizer(_read(f), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tokens = torch.tensor(ids, dtype=torch.int64)
    n_val = max(recipe.sequence * 8, len(tokens) // 50)
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
                         intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.layers,
                         num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
                         max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup, recipe.steps)
    model.train()
    loss_value = math.nan
    task = "stdlib-code: pretraining the base Llama"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report(task, 0, recipe.steps)
        for step in range(recipe.steps):
            starts = torch.randint(0, len(train_tokens) - recipe.sequence, (recipe.batch,), generator=generator)
            batch = torch.stack([train_tokens[s:s + recipe.sequence] for s in starts.tolist()])
            loss, _ = task_loss("causal-lm", model(input_ids=batch).logits, [batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.9 * loss_value + 0.1 * loss.item() if step else loss.item()
            report(task, step + 1, recipe.steps, f"loss {loss_value:.3f}")
        val = val_tokens[: len(val_tokens) - len(val_tokens) % recipe.sequence].reshape(-1, recipe.sequence)
        held_out = evaluate(model, TensorDataset(val, torch.ones_like(val)), device=torch.device("cpu"),
                            task="causal-lm")
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(str(folder))
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "layers": recipe.layers, "hidden_size": recipe.hidden_size, "steps": recipe.steps,
            "tokens_seen": recipe.steps * recipe.batch * recipe.sequence, "source_tokens": len(train_tokens),
            "source_held_out_perplexity": held_out.perplexity, "final_train_loss": loss_value,
            "seconds": time.perf_counter() - started, "torch_threads": 1}
