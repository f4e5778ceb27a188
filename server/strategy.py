"""The sparse strategy family on Flower's FedAvg: FedMef, FedTiny, FedDST, PQSU, FedAvg and FedDIP.

The server owns the global weights, the masks and every schedule. Each round it builds one message per
sampled node (the mask travels only to nodes that do not hold the current version), checks every reply
(a malformed one is dropped with a logged reason; the round goes on with the others), aggregates by
example count and, in adjustment rounds, changes the structure:

- FedMef / FedTiny (Algorithm 1, lines 25-36): weighted sparse average, weighted sum of the clients'
  top-K gradients, per layer drop the ξ smallest active weights and grow the ξ old-pruned positions
  with the largest summed gradient (grown at 0). FedMef's clients also run BaE first.
- FedDST: clients adjust their own masks; the server averages each weight over the clients keeping it,
  takes the union of the masks and re-prunes by magnitude to the target count per layer.
- PQSU: a static mask from the L1 magnitude of the initial weights.
- FedAvg: dense.
- FedDIP: clients train dense weights with error feedback and upload them; every reconfiguration
  interval the server prunes the average by global magnitude at the cubic schedule's sparsity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

from common.adjustment import global_magnitude_masks, magnitude_masks_within, masked_average, prune_and_grow, \
    sum_topk_gradients
from common.config import RunConfig
from common.masks import Masks, layer_sparsity, magnitude_masks, random_masks, sparsity
from common.protocol import Instructions
from common.schedules import adjust_counts, adjust_fraction, feddip_lambda, feddip_sparsity, is_adjustment_round, \
    round_learning_rate
from common.wire import ModelLayout, WireError, content_bytes, decode_positions, encode_masks, from_array_record, \
    pack_values, to_array_record, unpack_values

Evaluator = Callable[[dict[str, torch.Tensor], Masks], tuple[float, float]]


@dataclass
class Contribution:
    """One accepted reply, decoded into full-shape tensors."""

    node_id: int
    examples: int
    state: dict[str, torch.Tensor]
    masks: Masks | None  # the structure ``state`` lives under when it differs from the global one
    topk: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    metrics: dict


class SparseStrategy(FedAvg):
    """Common machinery; subclasses set the training mode and the structure policy."""

    mode = "masked"

    def __init__(self, cfg: RunConfig, template: nn.Module, evaluator: Evaluator | None = None,
                 on_round: Callable[[dict], None] | None = None):
        super().__init__(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                         min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=cfg.min_train_nodes,
                         min_available_nodes=cfg.min_train_nodes)
        self.cfg = cfg
        self.layout = ModelLayout.of(template)
        full = template.state_dict()
        self.state = {name: full[name].detach().clone().float() for name, _ in self.layout.masked + self.layout.dense}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.masks = self.initial_masks()
        self._prune_state()
        self.mask_version = 0
        self.node_versions: dict[int, int] = {}  # the mask version each node acknowledged
        self.evaluator = evaluator
        self.on_round = on_round
        self.record: dict = {}
        self._sent: dict[int, tuple[int, int]] = {}  # node -> (mask version sent, bytes sent)
        self.dense_bytes = 2 * content_bytes(RecordDict({"model": to_array_record(
            pack_values(self.state, self.layout, None))}))

    # ---------------------------------------------------------------- policy hooks

    def initial_masks(self) -> Masks:
        """Algorithm 1, line 2: random masks at ``s_tm`` with ERK (or uniform) layer densities."""
        return random_masks(self.layout.masked_shapes, self.cfg.param_sparsity, self.cfg.density, self.generator)

    def instructions(self, server_round: int) -> Instructions:
        cfg = self.cfg
        return Instructions(
            server_round=server_round, model=cfg.model, norm=cfg.resolved_norm,
            s_ta=cfg.s_ta if cfg.sap_on else -1.0, gamma=cfg.gamma, mode=self.mode,
            mask_version=self.mask_version, lr=round_learning_rate(cfg.lr, cfg.lr_decay, server_round), eta0=cfg.lr,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, local_epochs=cfg.local_epochs,
            max_local_steps=cfg.max_local_steps, batch_size=cfg.batch_size, seed=cfg.seed * 100_003 + server_round,
            counts=[], bae=False, bae_lambda=cfg.bae_lambda, topk=False, grad_batches=cfg.grad_batches,
            adjust_local=False, reg_lambda=0.0)

    def adjustment_counts(self, server_round: int) -> list[int]:
        """ξ_l per masked layer in an adjustment round (cosine schedule of §4.1), else empty."""
        cfg = self.cfg
        if not is_adjustment_round(server_round, cfg.delta_r, cfg.r_stop):
            return []
        counts = adjust_counts(self.masks, adjust_fraction(server_round, cfg.local_epochs, cfg.r_stop, cfg.adjust_alpha))
        return [counts[name] for name, _ in self.layout.masked] if any(counts.values()) else []

    def restructure(self, server_round: int, ins: Instructions, contributions: list[Contribution]) -> bool:
        """Change the structure after aggregation; returns whether the mask changed."""
        return False

    # ---------------------------------------------------------------- Flower's strategy interface

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.record = {"round": server_round, "started": time.time(), "rejected": [], "clients": []}
        self._sent = {}
        self._ins = self.instructions(server_round)
        self.record["adjusted"] = self._ins.adjusting
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        return [self.message_for(node, self._ins, MessageType.TRAIN) for node in node_ids]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ins = self._ins
        accepted: list[Contribution] = []
        received: list[int] = []  # bytes of every reply with content, accepted or not
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._reject(node, f"client error: {reply.error.reason}")
                continue
            up = content_bytes(reply.content)
            received.append(up)
            try:
                contribution = self.read_reply(node, reply.content, ins)
            except (WireError, KeyError, TypeError, ValueError) as exc:
                self._reject(node, f"malformed reply: {exc}")
                continue
            contribution.metrics.update(bytes_down=self._sent[node][1], bytes_up=up)
            accepted.append(contribution)
            self.node_versions[node] = self._sent[node][0]
        down = [sent for _, sent in self._sent.values()]
        self.record.update(bytes_down=_mean(down), bytes_up=_mean(received), dense_bytes_per_client=float(self.dense_bytes),
                           clients=[{"node_id": c.node_id, **c.metrics} for c in accepted])
        self.record["bytes_per_client"] = self.record["bytes_down"] + self.record["bytes_up"]
        log(INFO, "round %d bytes per client (down/up): %s", server_round,
            ", ".join(f"{c.node_id}: {c.metrics['bytes_down']}/{c.metrics['bytes_up']}" for c in accepted))
        if not accepted:
            log(WARNING, "round %d: no usable reply; the global model stays as it was", server_round)
            return None, None
        self.aggregate(accepted)
        if self.restructure(server_round, ins, accepted):
            self.mask_version += 1
        self._prune_state()
        self.record.update(sparsity=sparsity(self.masks), layer_sparsity=layer_sparsity(self.masks))
        total = sum(c.examples for c in accepted)
        loss = sum(c.metrics["loss"] * c.examples for c in accepted) / total
        return self.global_arrays(), MetricRecord({"train-loss": loss, "num-examples": total,
                                                  "clients": len(accepted)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        ins = self.instructions(server_round)
        return [self.message_for(node, ins, MessageType.EVALUATE)
                for node in self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                self.node_versions[reply.metadata.src_node_id] = self._sent[reply.metadata.src_node_id][0]
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.record["client_eval"] = dict(metrics)
        return metrics

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Centralised evaluation on the test set; closes the round's record (Flower calls it last)."""
        if self.evaluator is None:
            return None
        start = time.perf_counter()
        loss, accuracy = self.evaluator(self.global_state(), self.masks)
        metrics = MetricRecord({"test-loss": loss, "test-acc": accuracy})
        if server_round > 0 and self.record.get("round") == server_round:
            self.record.update(accuracy=accuracy, loss=loss, eval_time_s=time.perf_counter() - start,
                               round_time_s=time.time() - self.record.pop("started"))
            if self.on_round is not None:
                self.on_round(self.record)
        elif server_round == 0 and self.on_round is not None:
            self.on_round({"round": 0, "accuracy": accuracy, "loss": loss, "sparsity": sparsity(self.masks)})
        return metrics

    # ---------------------------------------------------------------- aggregation

    def read_reply(self, node: int, content: RecordDict, ins: Instructions) -> Contribution:
        """Decode and validate one reply; anything off raises WireError/ValueError."""
        metrics = dict(content["metrics"])
        examples = metrics.get("num-examples")
        if not isinstance(examples, int) or examples <= 0:
            raise WireError(f"num-examples must be a positive int, got {examples!r}")
        loss = metrics.get("train-loss")
        if not isinstance(loss, float) or not math.isfinite(loss):
            raise WireError(f"train-loss must be a finite float, got {loss!r}")
        arrays = from_array_record(content["model"])
        masks = self.reply_masks(content, ins)
        state = unpack_values(arrays, self.layout, None if self.mode != "masked" else (masks or self.masks))
        topk = None
        if ins.topk and ins.adjusting:
            if "topk" not in content:
                raise WireError("an adjustment round's reply lacks its top-K gradients")
            topk = {name: (idx, val) for name, (idx, val) in
                    decode_positions(from_array_record(content["topk"]), self.layout, "topk", True).items()}
            for (name, (idx, _)), count in zip(topk.items(), ins.counts):
                if idx.numel() > count or bool(self.masks[name].reshape(-1)[idx].any()):
                    raise WireError(f"top-K of {name!r}: more than {count} entries or an active position")
        client_metrics = {
            "partition_id": metrics.get("partition-id"), "examples": examples, "loss": metrics["train-loss"],
            "train_time_s": metrics.get("train-time-s"), "cpu_time_s": metrics.get("cpu-time-s"),
            "peak_rss_mb": metrics.get("peak-rss-mb"), "rss_mb": metrics.get("rss-mb"),
            "activation_bytes": metrics.get("activation-bytes"), "steps": metrics.get("steps"),
            "bae_marked": metrics.get("bae-marked"), "bae_norm_start": metrics.get("bae-norm-start"),
            "bae_norm_end": metrics.get("bae-norm-end"), "batch_size": metrics.get("batch-size")}
        if "device" in content:
            client_metrics["device"] = dict(content["device"])
        return Contribution(node, examples, state, masks, topk, client_metrics)

    def reply_masks(self, content: RecordDict, ins: Instructions) -> Masks | None:
        """The structure a reply's values live under when it is not the global mask (FedDST)."""
        return None

    def aggregate(self, contributions: list[Contribution]) -> None:
        """Weighted average by examples (Algorithm 1, line 26); pruned entries are 0 in every reply."""
        total = sum(c.examples for c in contributions)
        for name in self.state:
            self.state[name] = sum(c.state[name] * (c.examples / total) for c in contributions)

    # ---------------------------------------------------------------- helpers

    def global_state(self) -> dict[str, torch.Tensor]:
        """The model the clients receive: weights ⊙ mask and the dense tensors."""
        return {name: t * self.masks[name] if name in self.masks else t for name, t in self.state.items()}

    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord({name: t.contiguous() for name, t in self.global_state().items()})

    def _prune_state(self) -> None:
        for name, mask in self.masks.items():
            if self.mode == "masked":
                self.state[name] = self.state[name] * mask

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        available = len(list(grid.get_node_ids()))
        size = max(int(available * fraction), minimum)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, size)
        return node_ids

    def message_for(self, node: int, ins: Instructions, message_type: str) -> Message:
        """The message for one node: its instructions, the model's values and, if stale, the mask."""
        sparse = self.mode != "dense"
        content = RecordDict({
            "train": ConfigRecord(ins.to_config()),
            "model": to_array_record(pack_values(self.global_state(), self.layout, self.masks if sparse else None)),
        })
        if sparse and self.node_versions.get(node) != self.mask_version:
            content["masks"] = to_array_record({"bits": encode_masks(self.masks, self.layout)})
        self._sent[node] = (self.mask_version, content_bytes(content))
        return Message(content=content, dst_node_id=node, message_type=message_type)

    def _reject(self, node: int, reason: str) -> None:
        log(WARNING, "round %s: reply from node %d rejected: %s", self.record.get("round"), node, reason)
        self.record["rejected"].append({"node_id": node, "reason": reason})
        self.node_versions.pop(node, None)  # resend the mask next time, whatever the node holds


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


class FedMef(SparseStrategy):
    """Random prune, BaE + SAP on the clients, top-K gradients, server prune/grow (Algorithm 1)."""

    def instructions(self, server_round: int) -> Instructions:
        ins = super().instructions(server_round)
        counts = self.adjustment_counts(server_round)
        return replace(ins, counts=counts, topk=bool(counts), bae=bool(counts) and self.cfg.bae_on)

    def restructure(self, server_round: int, ins: Instructions, contributions: list[Contribution]) -> bool:
        if not ins.adjusting:
            return False
        total = sum(c.examples for c in contributions)
        scores = sum_topk_gradients([(c.examples / total, c.topk) for c in contributions], self.layout.masked_shapes)
        counts = dict(zip(self.masks, ins.counts))
        weights = {name: self.state[name] for name in self.masks}
        self.masks, new_weights = prune_and_grow(weights, self.masks, scores, counts)
        self.state.update(new_weights)
        log(INFO, "round %d: pruned and grew %d weights per adjustment (sparsity %.4f)", server_round,
            sum(counts.values()), sparsity(self.masks))
        return True


class FedTiny(FedMef):
    """FedMef's server-side adjustment without BaE and SAP, on the BatchNorm model (config defaults)."""


class FedDST(SparseStrategy):
    """Clients prune/grow locally mid-round; the server averages over keepers, unions and re-prunes."""

    def instructions(self, server_round: int) -> Instructions:
        counts = self.adjustment_counts(server_round)
        return replace(super().instructions(server_round), counts=counts, adjust_local=bool(counts))

    def reply_masks(self, content: RecordDict, ins: Instructions) -> Masks | None:
        if not ins.adjusting:
            return None
        if "flips" not in content:
            raise WireError("an adjustment round's reply lacks its mask flips")
        flips = decode_positions(from_array_record(content["flips"]), self.layout, "flips", False)
        masks: Masks = {}
        for name, mask in self.masks.items():
            flat = mask.reshape(-1).clone()
            flat[flips[name][0]] ^= True
            if int(flat.sum()) != int(mask.sum()):
                raise WireError(f"mask flips of {name!r} change the number of active weights")
            masks[name] = flat.reshape(mask.shape)
        return masks

    def aggregate(self, contributions: list[Contribution]) -> None:
        if all(c.masks is None for c in contributions):
            return super().aggregate(contributions)
        total = sum(c.examples for c in contributions)
        weighted = [(c.examples / total, {n: c.state[n] for n in self.masks}, c.masks or self.masks)
                    for c in contributions]
        averaged, union = masked_average(weighted)
        keep = {name: int(mask.sum()) for name, mask in self.masks.items()}
        self.masks = magnitude_masks_within(averaged, union, keep)
        for name in self.state:
            self.state[name] = averaged[name] if name in averaged else \
                sum(c.state[name] * (c.examples / total) for c in contributions)

    def restructure(self, server_round: int, ins: Instructions, contributions: list[Contribution]) -> bool:
        return ins.adjusting


class PQSU(SparseStrategy):
    """FL-PQSU: one L1-magnitude prune of the initial model on the server, then a static mask."""

    def initial_masks(self) -> Masks:
        weights = {name: self.state[name] for name, _ in self.layout.masked}
        return magnitude_masks(weights, self.cfg.param_sparsity, self.cfg.density)


class DenseFedAvg(SparseStrategy):
    """FedAvg on the dense model: every weight travels both ways."""

    mode = "dense"

    def initial_masks(self) -> Masks:
        return {name: torch.ones(shape, dtype=torch.bool) for name, shape in self.layout.masked}


class FedDIP(SparseStrategy):
    """FedDIP: ERK-random start at s0, error feedback, incremental regularisation, global magnitude
    reconfiguration on the cubic sparsity schedule; dense uploads."""

    mode = "error-feedback"

    def initial_masks(self) -> Masks:
        return random_masks(self.layout.masked_shapes, self.cfg.feddip_s0, self.cfg.density, self.generator)

    def instructions(self, server_round: int) -> Instructions:
        cfg = self.cfg
        reg = feddip_lambda(server_round, cfg.num_server_rounds, cfg.feddip_lambda_max, cfg.feddip_lambda_steps)
        return replace(super().instructions(server_round), reg_lambda=reg)

    def restructure(self, server_round: int, ins: Instructions, contributions: list[Contribution]) -> bool:
        cfg = self.cfg
        if server_round % cfg.feddip_interval and server_round != cfg.num_server_rounds:
            return False
        target = feddip_sparsity(server_round, cfg.num_server_rounds, cfg.feddip_s0, cfg.s_tm)
        self.masks = global_magnitude_masks({name: self.state[name] for name in self.masks}, target)
        return True


STRATEGIES: dict[str, type[SparseStrategy]] = {
    "fedmef": FedMef, "fedtiny": FedTiny, "feddst": FedDST, "pqsu": PQSU, "fedavg": DenseFedAvg, "feddip": FedDIP,
}


def make_strategy(cfg: RunConfig, template: nn.Module, evaluator: Evaluator | None = None,
                  on_round: Callable[[dict], None] | None = None) -> SparseStrategy:
    return STRATEGIES[cfg.strategy](cfg, template, evaluator, on_round)

