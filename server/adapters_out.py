"""Each method's final adapter in peft's own format, beside (or pointing at) the base it adapts.

`OUT/adapters/METHOD/` holds adapter_config.json and adapter_model.safetensors,
which stock `PeftModel.from_pretrained(base, OUT/adapters/METHOD)` loads. The
config's `base_model_name_or_path` names the base: the user's own model (path or
hub id) where the scenario was built on one, else a copy the scenario writes to
`OUT/adapters/base/` (a Hugging Face directory with its tokenizer, or
`model.safetensors` for a plain torch model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from torch import nn

from fedge.adapters import save_adapter
from fedge.methods import Method
from fedge.pretrained import save_base
from fedge.scenario import Scenario
from fedge.state import from_record

ADAPTERS_DIR = "adapters"
BASE_DIR = "base"


def base_reference(scenario: Scenario, adapters_dir: Path) -> str:
    """What an adapter names as its base: the scenario's answer (`save_base`, which may write a copy), or the base
    model saved under `adapters_dir/base`."""
    own = getattr(scenario, "save_base", None)
    if callable(own):
        return str(own(adapters_dir / BASE_DIR))
    tokenizer = scenario.tokenizer() if callable(getattr(scenario, "tokenizer", None)) else None  # type: ignore[attr-defined]
    return str(save_base(scenario.base_model(), adapters_dir / BASE_DIR, tokenizer).resolve())


def write_adapter(model: nn.Module, method: Method, arrays: ArrayRecord, scenario: Scenario,
                  out_dir: str | Path) -> dict[str, Any] | None:
    """The final global adapter of a LoRA method under `out_dir/adapters/METHOD` (None for whole-model methods).

    `model` is the method's federated model; it is loaded with the final state here.
    """
    if method.payload == "full":
        return None
    method.load_state(model, from_record(arrays))
    root = Path(out_dir) / ADAPTERS_DIR
    base = base_reference(scenario, root)
    directory = save_adapter(model, root / method.name, base)  # type: ignore[arg-type]
    weights = directory / "adapter_model.safetensors"
    return {"dir": str(directory.resolve()), "format": "peft", "base_model": base, "bytes": weights.stat().st_size}
