"""`hf`: a scenario built from a Hugging Face model and a data set of your own (`fedge run --model ... --data ...`).

The model loads with the `transformers` Auto classes (a local directory, or a
hub id where the hub is reachable); the data is a local `datasets.Dataset` read
from json/jsonl/csv/parquet/txt files and split among clients by a
`flwr-datasets` partitioner (`iid`, `dirichlet[:ALPHA]` over the label column,
`natural:COLUMN`); each client holds out part of its shard as its test split.
LoRA goes into peft's default targets for the architecture unless the run names
its own. Everything comes from run-config options, so the server and every
client build the same scenario. flwr-datasets' telemetry is off unless the
environment turns it on.
"""

from __future__ import annotations

import copy
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.scenario import ClientData
from fedge.sim.cache import cache_dir
from fedge.tiers import tier_for
from fedge.training import TASKS

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read by flwr-datasets when it is imported

#: file suffix -> the `datasets` builder that reads it
DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
PARTITIONS = ("iid", "dirichlet[:ALPHA]", "natural:COLUMN")
ROW = "__fedge_row"


class ScenarioError(ValueError):
    """The model, the data or the options do not make a scenario; the message says which and why."""


def data_files(data: str) -> tuple[str, list[str]]:
    """The `datasets` builder and the files of `data` (a file, or a folder of files of one kind)."""
    path = Path(data).expanduser()
    if not path.exists():
        raise ScenarioError(f"data {data!r} does not exist")
    files = sorted(f for f in path.rglob("*") if f.suffix in DATA_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ScenarioError(f"data folder {data!r} has no {'/'.join(DATA_BUILDERS)} files")
    builders = {DATA_BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        raise ScenarioError(f"data {data!r}: fedge reads {', '.join(DATA_BUILDERS)} files, not {path.suffix!r}")
    if len(builders) > 1:
        raise ScenarioError(f"data folder {data!r} mixes {sorted(b for b in builders if b)} files; keep one kind")
    return builders.pop(), [str(f.resolve()) for f in files]  # type: ignore[return-value]


def parse_partition(spec: str, alpha: float) -> tuple[str, Any]:
    """("iid", None), ("dirichlet", ALPHA) (the run's `alpha` when none is given) or ("natural", COLUMN)."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "dirichlet":
        try:
            value = float(arg) if arg else alpha
        except ValueError:
            value = -1.0
        if value <= 0:
            raise ScenarioError(f"partition {spec!r}: ALPHA must be a positive number")
        return "dirichlet", value
    if kind == "natural" and arg:
        return "natural", arg
    raise ScenarioError(f"partition {spec!r} is not one of {', '.join(PARTITIONS)}")


class HuggingFaceScenario:
    name = "hf"

    def __init__(self, seed: int = 0, alpha: float = 0.5, model: str = "", task: str = "", data: str = "",
                 text_column: str = "text", label_column: str = "label", partition: str = "iid",
                 max_length: int = 128, load_in_4bit: bool = False, test_fraction: float = 0.2) -> None:
        if not model or not data:
            raise ScenarioError("scenario 'hf' needs a model (--model PATH_OR_HUB_ID) and data (--data FILE_OR_DIR)")
        if task not in TASKS:
            raise ScenarioError(f"task must be one of {', '.join(TASKS)} (--task), not {task!r}")
        if max_length < 2:
            raise ScenarioError(f"max-length {max_length}: a sequence needs at least 2 tokens")
        self.seed, self.alpha = seed, alpha
        self.model, self.task, self.data = model, task, data
        self.text_column, self.label_column = text_column, label_column
        self.partition = parse_partition(partition, alpha)
        self.partition_spec = partition
        self.max_length = max_length
        self.load_in_4bit = load_in_4bit
        self.test_fraction = test_fraction
        self.builder, self.files = data_files(data)

    # ---- model -------------------------------------------------------------------
    @cached_property
    def _config(self) -> Any:
        from transformers import AutoConfig

        from fedge.pretrained import ModelLoadError, model_source

        try:
            return AutoConfig.from_pretrained(model_source(self.model))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read the configuration of model {self.model!r}: {err}") from err

    @property
    def architecture(self) -> str:
        return str(self._config.model_type)

    def tokenizer(self) -> Any:
        return self._tokenizer

    @cached_property
    def _tokenizer(self) -> Any:
        from fedge.pretrained import load_tokenizer

        return load_tokenizer(self.model)

    def _load(self, load_in_4bit: bool) -> nn.Module:
        from fedge.pretrained import load_pretrained

        return load_pretrained(self.model, self.task, num_labels=len(self.labels), seed=self.seed,  # type: ignore[arg-type]
                               load_in_4bit=load_in_4bit, pad_token_id=self.tokenizer().pad_token_id)

    @cached_property
    def _base(self) -> nn.Module:
        return self._load(False)

    def base_model(self) -> nn.Module:
        """The user's model for the task (a new classifier head drawn from the run's seed); 4-bit with QLoRA."""
        return self._load(True) if self.load_in_4bit else copy.deepcopy(self._base)

    @cached_property
    def lora_targets(self) -> list[str]:
        from fedge.pretrained import default_lora_targets

        return default_lora_targets(self._base)

    @cached_property
    def modules_to_save(self) -> list[str]:
        """A classifier's head is new: it trains whole beside LoRA (peft's `modules_to_save`)."""
        from fedge.pretrained import classifier_head

        return classifier_head(self._base) if self.task == "classification" else []

    @property
    def base_reference(self) -> str:
        """The user's model as adapters name it: its absolute path, or the hub id."""
        from fedge.pretrained import model_source

        return model_source(self.model)

    def save_base(self, directory: Path) -> str:
        """The user's model stays where it is (nothing is copied): adapters refer to it."""
        return self.base_reference

    @property
    def num_classes(self) -> int:
        return len(self.labels) if self.task == "classification" else len(self.tokenizer())

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (int(self._tokens[0].shape[1]),)

    # ---- data --------------------------------------------------------------------
    @cached_property
    def dataset(self) -> Any:
        """The rows of the data files, each numbered (`__fedge_row`) so a partition finds its tokens."""
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(self.builder, data_files=self.files, split="train",
                                       cache_dir=str(cache_dir() / "datasets"))
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
            raise ScenarioError(f"data {self.data!r} does not read as {self.builder}: {err}") from err
        needed = [self.text_column] + ([self.label_column] if self.task == "classification" else [])
        if self.partition[0] == "dirichlet":
            needed.append(self.label_column)
        if self.partition[0] == "natural":
            needed.append(self.partition[1])
        missing = [c for c in dict.fromkeys(needed) if c not in ds.column_names]
        if missing:
            raise ScenarioError(f"data {self.data!r} has no column {', '.join(map(repr, missing))}; its columns: "
                                f"{', '.join(ds.column_names)} (--text-column, --label-column, --partition)")
        if len(ds) < 2:
            raise ScenarioError(f"data {self.data!r} has {len(ds)} rows; a federation needs more")
        return ds.add_column(ROW, list(range(len(ds))))

    @cached_property
    def labels(self) -> list[Any]:
        """The label values in id order (sorted), the same for every client whatever its shard holds."""
        if self.task != "classification":
            return []
        values = sorted(set(self.dataset[self.label_column]), key=lambda v: (str(type(v)), v))
        if len(values) < 2:
            raise ScenarioError(f"label column {self.label_column!r} has {len(values)} distinct value(s); "
                                "a classifier needs at least 2")
        return values

    @cached_property
    def _tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's token ids and attention mask, right-padded to the longest row (at most `max_length`)."""
        texts = ["" if t is None else str(t) for t in self.dataset[self.text_column]]
        enc = self.tokenizer()(texts, truncation=True, max_length=self.max_length, padding="longest",
                               return_tensors="pt")
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)

    def _partitioner(self, num_partitions: int) -> Any:
        """The flwr-datasets partitioner over the whole data set (built once per client count)."""
        if num_partitions not in self._partitioners:
            self._partitioners[num_partitions] = self._new_partitioner(num_partitions)
        return self._partitioners[num_partitions]

    @cached_property
    def _partitioners(self) -> dict[int, Any]:
        return {}

    def _new_partitioner(self, num_partitions: int) -> Any:
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

        kind, arg = self.partition
        if kind == "iid":
            partitioner: Any = IidPartitioner(num_partitions)
        elif kind == "dirichlet":
            partitioner = DirichletPartitioner(num_partitions, partition_by=self.label_column, alpha=arg,
                                               min_partition_size=2, seed=self.seed)
        else:
            partitioner = NaturalIdPartitioner(partition_by=arg)
        partitioner.dataset = self.dataset
        if kind == "natural" and partitioner.num_partitions != num_partitions:
            raise ScenarioError(f"partition natural:{arg} makes {partitioner.num_partitions} clients (one per "
                                f"distinct {arg!r}); run with that many clients, not {num_partitions}")
        return partitioner

    def _rows(self, partition_id: int, num_partitions: int) -> np.ndarray:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
        try:
            shard = self._partitioner(num_partitions).load_partition(partition_id)
        except ValueError as err:  # flwr-datasets' own reasons (too few rows for the clients, ...)
            raise ScenarioError(f"cannot split {len(self.dataset)} rows among {num_partitions} clients "
                                f"({self.partition_spec}): {err}") from err
        rows = np.asarray(shard[ROW], dtype=np.int64)
        if len(rows) < 2:
            raise ScenarioError(f"client {partition_id} gets {len(rows)} row(s) of {len(self.dataset)}; it needs 2 "
                                "(one to train, one to test): use fewer clients or more data")
        return rows

    def _split(self, rows: np.ndarray) -> TensorDataset:
        ids, mask = self._tokens
        index = torch.from_numpy(rows)
        if self.task == "classification":
            return TensorDataset(ids[index], mask[index], self._label_ids[index])
        return TensorDataset(ids[index], mask[index])

    @cached_property
    def _label_ids(self) -> torch.Tensor:
        label_id = {v: i for i, v in enumerate(self.labels)}
        return torch.tensor([label_id[v] for v in self.dataset[self.label_column]], dtype=torch.int64)

    def client_data(self, partition_id: int, num_partitions: int) -> ClientData:
        rows = self._rows(partition_id, num_partitions)
        order = np.random.default_rng([self.seed, 5, partition_id]).permutation(len(rows))
        n_test = min(len(rows) - 1, max(1, round(self.test_fraction * len(rows))))
        return ClientData(train=self._split(np.sort(rows[order[n_test:]])), test=self._split(np.sort(rows[order[:n_test]])),
                          tier=tier_for(partition_id))

    def describe(self, num_partitions: int) -> dict[str, Any]:
        clients = []
        for p in range(num_partitions):
            data = self.client_data(p, num_partitions)
            clients.append({"partition_id": p, "train_samples": len(data.train), "test_samples": len(data.test),
                            "tier": tier_for(p).tier})
        described: dict[str, Any] = {
            "name": self.name, "task": self.task, "model": self.base_reference, "architecture": self.architecture,
            "data": [str(Path(f)) for f in self.files], "rows": len(self.dataset), "text_column": self.text_column,
            "partition": self.partition_spec, "max_length": self.max_length, "sequence_length": self.sample_shape[0],
            "lora_targets": self.lora_targets, "seed": self.seed, "num_partitions": num_partitions, "clients": clients,
        }
        if self.task == "classification":
            described.update(label_column=self.label_column, labels=[str(v) for v in self.labels])
        return described
