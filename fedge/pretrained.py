"""Hugging Face models and tokenizers: loading with the Auto classes, QLoRA's 4-bit base, peft's default LoRA
targets, and the base saved where adapters can find it.

A model is a local directory or, where the hub is reachable, a hub id; nothing
is fetched unless the user names a hub id. A new head (a classifier on a
pretrained body) is initialised from the run's seed, so that the server and
every client build the same model without shipping it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedge.training import Task

#: what a hub id looks like ("name" or "owner/name"); anything else must be a local directory
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """The model (or its tokenizer) cannot be loaded as asked: a path that is not there, a hub out of reach,
    a task the checkpoint does not fit, or 4-bit loading without a GPU."""


def model_source(name_or_path: str) -> str:
    """A local model directory (absolute), or the hub id to ask for; anything else is refused with the reason."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model {name_or_path!r} is a path but holds no config.json "
                                 "(save the model there with save_pretrained)")
        return str(path.resolve())
    if not HUB_ID.match(name_or_path):
        raise ModelLoadError(f"model {name_or_path!r} is neither an existing directory nor a hub id")
    return name_or_path


def check_4bit(device: torch.device) -> None:
    """QLoRA's 4-bit base needs bitsandbytes' CUDA kernels: refuse anywhere else, before anything loads."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelLoadError("load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on "
                             f"the {device.type.upper()}; drop --load-in-4bit to train the base in full precision here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelLoadError("load-in-4bit needs bitsandbytes: pip install 'fedge[qlora]'") from err


def quantization_4bit() -> Any:
    """NF4 weights with double quantization, computing in bf16: the QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def quiet_transformers() -> None:
    """transformers draws a progress bar for every load and save, and a load report for every new head (fedge draws
    new heads from the run's seed on purpose); fedge's own progress and errors are what a run shows."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_pretrained(name_or_path: str, task: Task, *, num_labels: int = 0, seed: int = 0, load_in_4bit: bool = False,
                    pad_token_id: int | None = None) -> nn.Module:
    """The model for `task` through the Auto classes (a causal LM, or a sequence classifier with `num_labels`).

    fp32 weights, eager CPU load; with `load_in_4bit`, NF4 on the current CUDA device (QLoRA).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = model_source(name_or_path)
    quiet_transformers()
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if load_in_4bit:
        check_4bit(torch.device("cuda"))
        kwargs.update(quantization_config=quantization_4bit(), dtype=torch.bfloat16,
                      device_map={"": torch.cuda.current_device()})
    if task == "classification":
        if num_labels < 2:
            raise ModelLoadError(f"a classifier needs at least 2 labels, the data has {num_labels}")
        kwargs.update(num_labels=num_labels)
        if pad_token_id is not None:
            kwargs.update(pad_token_id=pad_token_id)
        auto: Any = AutoModelForSequenceClassification
    elif task == "causal-lm":
        auto = AutoModelForCausalLM
    else:
        raise ModelLoadError(f"task must be causal-lm or classification, not {task!r}")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # a head the checkpoint lacks is drawn from the run's seed, alike everywhere
            model = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load {name_or_path!r} as a {task} model: {err}") from err
    return model


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer; one without a padding token pads with its end-of-text token (right side)."""
    from transformers import AutoTokenizer

    source = model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {name_or_path!r} has neither a padding nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def default_lora_targets(model: nn.Module) -> list[str]:
    """peft's LoRA targets for the model's architecture (what `LoraConfig(target_modules=None)` would pick)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULTS:
        raise ModelLoadError(f"peft has no default LoRA targets for model type {model_type!r}; "
                             "name them with --lora-targets (e.g. q_proj,v_proj)")
    return list(DEFAULTS[model_type])


def classifier_head(model: nn.Module) -> list[str]:
    """The head a sequence classifier adds to a pretrained body (trained whole beside LoRA), as peft names it."""
    heads = [name for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module)]
    if not heads:
        raise ModelLoadError(f"{type(model).__name__} has no classifier head named 'classifier' or 'score'")
    return heads


def save_base(model: nn.Module, directory: str | Path, tokenizer: Any | None = None) -> Path:
    """Write the base where an adapter can refer to it: `save_pretrained` for a Hugging Face model (with its
    tokenizer), else the state dict as `model.safetensors`."""
    from fedge.atomic_file import atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    else:
        from safetensors.torch import save

        atomic_write(directory / "model.safetensors",
                     save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    return directory
