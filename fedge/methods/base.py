"""What a method is: its payload, its client handlers, its server strategy and its own run-config section.

The ClientApp hands each message to the method's `train` or `evaluate` handler
with a `Job` (the node's data, the model loaded with the state the message
carries); the ServerApp's round loop drives the strategy the method builds.
`resolve` turns a run config into the settings, the method and its options,
and refuses any key the run would not use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedge.codecs import available_codecs
from fedge.federated_model import build_federated_model, exchanged_state, fold_lora, load_exchanged_state
from fedge.messages import ARRAYS_RECORD, METRICS_RECORD, SERVER_ROUND_KEY
from fedge.registry import Registry
from fedge.scenario import SCENARIOS, ClientData, Scenario, scenario_options
from fedge.settings import ConfigSection, NoOptions, RunSettings
from fedge.state import from_record
from fedge.training import TrainStats, autocast_dtype, evaluate, train_epochs


@dataclass
class RunSpec:
    """A resolved run config: the common settings, the method, and the method's own options."""

    settings: RunSettings
    method: Method
    options: Any

    def to_config(self) -> dict[str, Any]:
        """The run config a server sends: common keys plus the method's section (`<method>.<key>`)."""
        section = {f"{self.method.name}.{k}": v for k, v in self.options.to_config().items()}
        return {**self.settings.to_config(), **section}


@dataclass
class Job:
    """What a method's client handler needs for one message: settings, data, and the model holding the global state."""

    spec: RunSpec
    partition_id: int
    data: ClientData
    scenario: Scenario
    model: nn.Module
    global_state: OrderedDict[str, np.ndarray]
    server_round: int
    device: torch.device

    @property
    def settings(self) -> RunSettings:
        return self.spec.settings

    @property
    def method(self) -> Method:
        return self.spec.method

    @property
    def options(self) -> Any:
        return self.spec.options

    @property
    def lr(self) -> float:
        return self.settings.lr or self.method.lr

    @property
    def seed(self) -> int:
        """Distinct per run, round and client, reproducible across reruns."""
        return self.settings.seed * 100_003 + self.server_round * 1_009 + self.partition_id

    def train_local(self) -> TrainStats:
        """The run's local epochs on the node's train split, for the scenario's task and in the run's precision."""
        s = self.settings
        return train_epochs(self.model, self.data.train, epochs=s.local_epochs, lr=self.lr, batch_size=s.batch_size,
                            device=self.device, seed=self.seed, task=self.scenario.task,
                            autocast=autocast_dtype(s.precision, self.device))


#: a client handler: one message in, its reply out (the Context holds what the node keeps between rounds)
Handler = Callable[[Job, Message, Context], Message]
#: the global state a message carries, given the exchanged state of a freshly built model (FLASC: a sparse download)
Receiver = Callable[[Message, "OrderedDict[str, np.ndarray]", RunSpec], "OrderedDict[str, np.ndarray]"]
#: the server strategy of a run, given the exchanged state the run starts from
StrategyFactory = Callable[[RunSpec, "OrderedDict[str, np.ndarray]"], Strategy]


def receive_arrays(msg: Message, initial: OrderedDict[str, np.ndarray], spec: RunSpec) -> OrderedDict[str, np.ndarray]:
    """The global state as Flower's dense ArrayRecord."""
    return from_record(msg.content.array_records[ARRAYS_RECORD])


def evaluate_global(job: Job, msg: Message, context: Context) -> Message:
    """The global model on the client's own test split; without a personal model it is also what the client serves.

    `num-examples` counts predictions (samples; a causal LM's real next tokens) and `loss-sum` sums their loss,
    so the server pools clients exactly (accuracy, perplexity).
    """
    result = evaluate(job.model, job.data.test, device=job.device, task=job.scenario.task)
    metrics = MetricRecord({
        "num-examples": result.predictions,
        "correct": result.correct,
        "accuracy": result.accuracy,
        "loss-sum": result.loss_sum,
        "personal-correct": result.correct,
        "personal-loss-sum": result.loss_sum,
        "mean-entropy": result.mean_entropy,
        "partition-id": job.partition_id,
    })
    return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=msg)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    #: what is trained and exchanged: "full" (the whole model), "lora" (A and B) or "lora-b" (A frozen)
    payload: str
    train: Handler
    strategy: StrategyFactory
    evaluate: Handler = evaluate_global
    receive: Receiver = receive_arrays
    #: the method's own run-config section (`<name>.<key>`)
    options: type[ConfigSection] = NoOptions
    #: local Adam learning rate unless the run sets one (adapters want a larger step than full models)
    lr: float = 3e-3
    #: config keys its strategy adds to a round's config (not run-config keys)
    protocol_keys: tuple[str, ...] = field(default=())
    #: what `downlink-codec = auto` sends: "dense", a codec name, or "own" (the method's own download, no other)
    downlink: str = "dense"
    #: whether its strategy can send coded downloads (`fedge.methods.downlink`)
    coded_downlink: bool = False
    #: why the method cannot run on a scenario ("" where it can)
    unsupported: Callable[[Scenario], str] = field(default=lambda scenario: "")

    def check_scenario(self, scenario: Scenario) -> None:
        """Refuse, before anything trains, a scenario the method cannot run on, saying why."""
        reason = self.unsupported(scenario)
        if reason:
            raise ValueError(f"{self.name} cannot run on scenario {scenario.name!r} ({scenario.task}): {reason}")

    def build_model(self, scenario: Scenario, settings: RunSettings) -> nn.Module:
        return build_federated_model(scenario, self.payload, rank=settings.lora_rank, alpha=settings.lora_alpha,
                                     seed=settings.seed, targets=settings.targets())

    def exchanged_state(self, model: nn.Module) -> OrderedDict[str, np.ndarray]:
        return exchanged_state(model, self.payload)

    def load_state(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        load_exchanged_state(model, self.payload, state)

    def evaluation_model(self, scenario: Scenario, settings: RunSettings,
                         msg: Message) -> tuple[nn.Module, OrderedDict[str, np.ndarray]] | None:
        """The model an evaluate message describes, built without peft: the base with the message's dense LoRA
        state folded in, and that state; None where the federated model must be built (the method evaluates
        in its own way, exchanges LoRA B only, or a layer does not fold).
        """
        if self.payload != "lora" or self.evaluate is not evaluate_global or ARRAYS_RECORD not in msg.content.array_records:
            return None
        state = from_record(msg.content.array_records[ARRAYS_RECORD])
        model = fold_lora(scenario.base_model(), state, rank=settings.lora_rank, alpha=settings.lora_alpha)
        return None if model is None else (model, state)


#: `downlink-codec` values besides codec names: the method's default, and Flower's dense ArrayRecord (no reference
#: kept); a method whose `downlink` is OWN sends its own download (FLASC's top-k of its adapter) and takes no other
AUTO, DENSE, OWN = "auto", "dense", "own"

METHODS: Registry[Method] = Registry("method", "fedge.methods")


def register_method(method: Method) -> Method:
    METHODS.register(method.name, method)
    return method


def get_method(name: str) -> Method:
    return METHODS.get(name)


def available_methods() -> list[str]:
    return METHODS.names()


def resolve(config: Mapping[str, Any]) -> RunSpec:
    """Settings, method and options from a run config; a key that this run would not use is an error.

    Keys of other methods' sections are other methods' settings (pyproject.toml lists every
    method's defaults) and are checked but not used; an unknown key, an unknown section or an
    unknown key inside a section is refused with the list of valid keys.
    """
    settings = RunSettings.from_config(config)
    settings.validate()
    SCENARIOS.get(settings.scenario)  # an unknown scenario is refused with the known ones
    scenario_options(settings)  # the scenario options the run sets are ones its scenario takes
    method = get_method(settings.method)
    own = {k[len(method.name) + 1:]: v for k, v in config.items() if k.startswith(method.name + ".")}
    options = method.options.from_config(own)
    allowed = set(RunSettings.config_keys()) | {SERVER_ROUND_KEY, *method.protocol_keys}
    sections = set(available_methods())
    unknown = []
    for key in config:
        section, dot, rest = key.partition(".")
        if not dot:
            if key not in allowed:
                unknown.append(key)
        elif section not in sections or rest not in get_method(section).options.config_keys():
            unknown.append(key)
    if unknown:
        valid = sorted(RunSettings.config_keys()) + [f"{method.name}.{k}" for k in method.options.config_keys()]
        raise ValueError(f"run config keys {sorted(unknown)} are not used by a {method.name} run; "
                         f"valid keys: {', '.join(valid)}")
    spec = RunSpec(settings, method, options)
    downlink_codec_name(spec)  # refuses a downlink this method cannot send, before the run starts
    if settings.eval_clients < 0:
        raise ValueError(f"eval-clients must be 0 (the default sample) or a count, got {settings.eval_clients}")
    return spec


def downlink_codec_name(spec: RunSpec) -> str:
    """The run's downlink: a codec name, `dense` (Flower's ArrayRecord, as before) or `own` (the method's own)."""
    name, method = spec.settings.downlink_codec, spec.method
    if name == AUTO:
        return method.downlink
    if method.downlink == OWN:
        raise ValueError(f"{method.name} sends its own download; downlink-codec must be {AUTO!r} for it, not {name!r}")
    if name != DENSE and not method.coded_downlink:
        raise ValueError(f"{method.name} takes dense downloads only (downlink-codec {AUTO!r} or {DENSE!r}), "
                         f"not {name!r}")
    if name != DENSE and name not in available_codecs():
        raise ValueError(f"downlink-codec {name!r} is not a codec; known: {', '.join(available_codecs())}")
    return name


def sampling(settings: RunSettings) -> dict[str, float | int]:
    """Flower's client-sampling knobs from fedge's clients / clients-per-round."""
    per_round = settings.clients_per_round or settings.num_clients
    return {
        "fraction_train": per_round / settings.num_clients,
        "min_train_nodes": per_round,
        "fraction_evaluate": 1.0,
        "min_evaluate_nodes": settings.num_clients,
        "min_available_nodes": settings.num_clients,
    }
