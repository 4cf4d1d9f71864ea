"""Block averaging for pFedGate: each parameter block is the mean over the clients that sent it.

Clients upload only the blocks their knapsack kept, so a block's new value is
the sample-weighted mean over its senders and keeps its previous value when
nobody sent it. The strategy learns each node's partition and profile once
(`fedge.messages.NODE_QUERY`), holds the last `novel_clients` partitions out of training,
and after the federation lets those nodes join: they train only their gate on
the final shared model and report their accuracy before and after.

Uplink is accounted against the dense alternative: for each reply, the same
message with the full shared state in place of its blocks, and that size
weighted by the client's sparsity budget.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedge.messages import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    NODE_QUERY,
    NODE_RECORD,
    SERVER_ROUND_KEY,
    message_wire_bytes,
    record_wire_bytes,
    scalar,
    total_wire_bytes,
)
from fedge.methods.pfedgate.blocks import (
    BLOCK_MASK,
    BLOCK_VALUES,
    NOVEL_PHASE,
    PHASE_KEY,
    UPLOAD_RECORD,
    BlockLayout,
    BlockUpload,
    block_average,
)
from fedge.results import ClientEval, fleet_accuracy
from fedge.state import from_record, to_record

log = logging.getLogger("fedge.server")


def decode_upload(layout: BlockLayout, reply: Message) -> BlockUpload:
    """One reply's kept blocks and sample weight; ValueError if it is malformed."""
    try:
        record = reply.content.array_records[UPLOAD_RECORD]
        values, bits = record[BLOCK_VALUES].numpy(), record[BLOCK_MASK].numpy()
        weight = scalar(reply.content.metric_records[METRICS_RECORD]["num-examples"])
    except KeyError as err:
        raise ValueError(f"block upload lacks {err}") from err
    except TypeError as err:
        raise ValueError(f"block upload's num-examples: {err}") from err
    mask, blocks = layout.unpack(values, bits)
    if not np.isfinite(values).all() or not weight > 0:
        raise ValueError("block upload has non-finite values or no examples")
    return BlockUpload(mask, blocks, weight)


class BlockAvgStrategy(FedAvg):
    def __init__(self, *, initial: Mapping[str, np.ndarray], splits: int, novel_clients: int, timeout: float,
                 seed: int = 0, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.layout = BlockLayout.of_state(initial, splits)
        self.novel_clients = novel_clients
        self.timeout = timeout
        self.profiles: dict[int, dict[str, Any]] = {}
        self.uplink = {"bytes": 0, "dense_bytes": 0, "budget_weighted_dense_bytes": 0.0}
        self.control_bytes = 0
        self._rng = random.Random(seed)
        self._previous: dict[str, np.ndarray] = dict(initial)

    # ---- checkpoints (fedge.server.checkpoints.Stateful): byte totals survive a resume; profiles are asked again ----
    def state_dict(self) -> dict[str, Any]:
        return {"uplink": dict(self.uplink), "control_bytes": self.control_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.uplink = {k: type(v)(state["uplink"][k]) for k, v in self.uplink.items()}
        self.control_bytes = int(state["control_bytes"])

    # ---- who is who ------------------------------------------------------------------
    def learn_profiles(self, grid: Grid, config: ConfigRecord) -> dict[int, dict[str, Any]]:
        """Ask nodes not yet known for their partition and profile (one small query each)."""
        unknown = [n for n in grid.get_node_ids() if n not in self.profiles]
        if unknown:
            queries = [Message(RecordDict({CONFIG_RECORD: config}), dst_node_id=n, message_type=NODE_QUERY) for n in unknown]
            self.control_bytes += total_wire_bytes(queries)
            for reply in grid.send_and_receive(queries, timeout=self.timeout):
                if reply.has_error():
                    log.warning("profile query to node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                    continue
                self.control_bytes += message_wire_bytes(reply)
                self.profiles[reply.metadata.src_node_id] = dict(reply.content.config_records[NODE_RECORD])
        return self.profiles

    def is_novel(self, node_id: int) -> bool:
        p = self.profiles[node_id]
        return int(p["partition-id"]) >= int(p["num-partitions"]) - self.novel_clients

    # ---- training ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling, restricted to nodes that take part in the federation (novel nodes wait)."""
        self._previous = from_record(arrays)
        profiles = self.learn_profiles(grid, config)
        pool = sorted(n for n in grid.get_node_ids() if n in profiles and not self.is_novel(n))
        if not pool or self.fraction_train == 0.0:
            return []
        size = min(len(pool), max(int(len(pool) * self.fraction_train), self.min_train_nodes))
        nodes = self._rng.sample(pool, size)
        config[SERVER_ROUND_KEY] = server_round
        return self._construct_messages(RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: config}), nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        uploads: list[BlockUpload] = []
        losses, kept, sent_bytes, dense_bytes, budget_bytes = [], [], 0, 0, 0.0
        dense_record = record_wire_bytes(to_record(self._previous))
        for reply in replies:
            try:
                upload = decode_upload(self.layout, reply)
            except ValueError as err:
                log.warning("round %d: node %s sent a bad block upload (%s); dropped", server_round,
                            reply.metadata.src_node_id, err)
                continue
            uploads.append(upload)
            m = reply.content.metric_records[METRICS_RECORD]
            actual = message_wire_bytes(reply)
            dense = actual - record_wire_bytes(reply.content.array_records[UPLOAD_RECORD]) + dense_record
            sent_bytes += actual
            dense_bytes += dense
            budget_bytes += scalar(m["sparsity-budget"]) * dense
            losses.append((scalar(m["train-loss"]), upload.weight))
            kept.append(scalar(m["kept-fraction"]))
        if not uploads:
            return None, None
        self._previous = block_average(self.layout, self._previous, uploads)
        self.uplink["bytes"] += sent_bytes
        self.uplink["dense_bytes"] += dense_bytes
        self.uplink["budget_weighted_dense_bytes"] += budget_bytes
        covered = np.any([u.mask for u in uploads], axis=0)
        metrics = MetricRecord({
            "train-loss": sum(l * w for l, w in losses) / sum(w for _, w in losses),
            "kept-fraction": float(np.mean(kept)),
            "block-coverage": float(self.layout.sizes[covered].sum() / self.layout.total),
            "dense-uplink-bytes": dense_bytes,
            "budget-uplink-bytes": budget_bytes,
        })
        return to_record(self._previous), metrics

    # ---- after the federation ------------------------------------------------------------
    def finish(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord) -> dict[str, Any]:
        """Novel nodes join (gate-only training), then every node reports; returns the results-entry fields."""
        profiles = self.learn_profiles(grid, config)
        novel = sorted(n for n in grid.get_node_ids() if n in profiles and self.is_novel(n))
        novel_config = ConfigRecord({**dict(config), PHASE_KEY: NOVEL_PHASE, SERVER_ROUND_KEY: 0})
        messages = self._construct_messages(RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: novel_config}), novel,
                                            MessageType.TRAIN)
        novel_down = total_wire_bytes(messages)
        novel_clients = []
        for reply in grid.send_and_receive(messages, timeout=self.timeout) if messages else []:
            if reply.has_error():
                log.warning("novel node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            m = reply.content.metric_records[METRICS_RECORD]
            novel_clients.append({
                "partition_id": int(scalar(m["partition-id"])),
                "tier": profiles[reply.metadata.src_node_id]["tier"],
                "sparsity_budget": scalar(m["sparsity-budget"]),
                "kept_fraction": scalar(m["kept-fraction"]),
                "accuracy_global_model": scalar(m["accuracy-global"]),
                "accuracy_before": scalar(m["accuracy-before"]),
                "accuracy_after": scalar(m["accuracy-after"]),
                "test_examples": int(scalar(m["test-examples"])),
                "uplink_bytes": message_wire_bytes(reply),
            })
        clients, evals = self._final_evaluation(grid, arrays, config)
        fleet = fleet_accuracy(evals)
        out: dict[str, Any] = {
            "uplink": {**self.uplink, "control_bytes": self.control_bytes},
            "clients": clients,
            # one more evaluation of every node once the novel ones joined (gates tuned once more)
            "end_evaluation": {"accuracy": fleet.accuracy, "personalized_accuracy": fleet.personalized_accuracy,
                                 "bottom_decile_accuracy": fleet.bottom_decile_accuracy, "clients": fleet.clients},
            "novel_downlink_bytes": novel_down,
        }
        if novel_clients:
            out["novel_client"] = novel_clients[0] if len(novel_clients) == 1 else novel_clients
        return out

    def _final_evaluation(self, grid: Grid, arrays: ArrayRecord,
                          config: ConfigRecord) -> tuple[list[dict[str, Any]], list[ClientEval]]:
        messages = list(self.configure_evaluate(0, arrays, ConfigRecord(dict(config)), grid))
        clients, evals = [], []
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                continue
            m = reply.content.metric_records[METRICS_RECORD]
            node = reply.metadata.src_node_id
            evals.append(ClientEval(int(scalar(m["partition-id"])), int(scalar(m["num-examples"])), int(scalar(m["correct"])),
                                    int(scalar(m["personal-correct"]))))
            clients.append({
                "partition_id": int(scalar(m["partition-id"])),
                "role": "novel" if node in self.profiles and self.is_novel(node) else "federated",
                "tier": self.profiles.get(node, {}).get("tier", "?"),
                "sparsity_budget": scalar(m["sparsity-budget"]),
                "kept_fraction": scalar(m["kept-fraction"]) if "kept-fraction" in m else 0.0,
                "test_examples": int(scalar(m["num-examples"])),
                "accuracy": scalar(m["accuracy"]),
                "personal_accuracy": scalar(m["personal-accuracy"]),
            })
        return sorted(clients, key=lambda c: c["partition_id"]), evals
