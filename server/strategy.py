"""The sparse strategy family on Flower's Strategy: FedMef, FedTiny, FedDST, PQSU, FedAvg and FedDIP.

The server owns the global weights, the masks and every schedule. Each round it builds one message per
sampled node (the mask travels only to nodes that do not hold the current version), checks every reply
(a malformed one is dropped with a logged reason; the round goes on with the others), aggregates by
|D_k| (each client's training-set size) and, in adjustment rounds, changes the structure:

- FedMef / FedTiny (Algorithm 1, lines 25-36): weighted sparse average, weighted sum of the clients'
  top-K gradients, per layer drop the ξ smallest active weights and grow the ξ old-pruned positions
  with the largest summed gradient (grown at 0). FedMef's clients also run BaE first.
- FedDST: clients adjust their own masks; the server averages each weight over the clients keeping it,
  takes the union of the masks and re-prunes by magnitude to the target count per layer.
- PQSU: a static mask from the L1 magnitude of the initial weights.
- FedAvg: dense.
- FedDIP: clients train dense weights with error feedback and upload them; every reconfiguration
  interval the server prunes the average by global magnitude at the cubic schedule's sparsity.

Each class registers itself under its entry of :data:`common.methods.METHODS`, which gives its training
mode. :class:`SparseStrategy` subclasses Flower's ``Strategy`` directly: FedAvg's shared message,
key-by-key averaging and metric aggregation are all replaced here, so it would give nothing. What a
round accumulates lives in one :class:`RoundState`, from ``configure_train`` to :meth:`round_record`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any, ClassVar, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from common.methods import METHODS, Mode
from common.protocol.config import RunConfig
from common.protocol.instructions import Instructions, round_instructions
from common.protocol.wire import (
    ModelLayout,
    WireError,
    content_bytes,
    decode_positions,
    encode_masks,
    from_array_record,
    pack_values,
    to_array_record,
    unpack_values,
)
from common.pruning.adjustment import (
    global_magnitude_masks,
    magnitude_masks_within,
    masked_average,
    prune_and_grow,
    sum_topk_gradients,
)
from common.pruning.bae import Marks, mark_low, marked_norm
from common.pruning.masks import (
    Distribution,
    Masks,
    deviations,
    filter_centres,
    layer_sparsity,
    magnitude_masks,
    random_masks,
    sparsity,
)
from common.pruning.schedules import (
    adjust_counts,
    adjust_fraction,
    feddip_lambda,
    feddip_sparsity,
    is_adjustment_round,
)
from server.bounds import beyond_round, state_norm, update_distance
from server.fleet import (
    IDENTITY_TIMEOUT_S,
    NodeKey,
    OverSelectingGrid,
    ask_partition_ids,
    node_key,
    sample_nodes,
    wait_for_nodes,
)

# (loss, accuracy) of a global model given as its state and masks, on the server's test set
Evaluator = Callable[[dict[str, torch.Tensor], Masks], tuple[float, float]]


class FleetError(RuntimeError):
    """The nodes cannot take part in the run as they are set up."""


@dataclass
class Contribution:
    """One accepted reply, decoded into full-shape tensors."""

    node_id: int
    examples: int  # processed in the round (steps × batch): a metric, the weight of the mean loss
    train_size: int  # |D_k|, the client's training examples: its weight in every aggregation
    state: dict[str, torch.Tensor]
    masks: Masks | None  # the structure ``state`` lives under when it differs from the global one
    topk: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    metrics: dict


def data_weights(contributions: list[Contribution]) -> list[float]:
    """|D_k| / Σ|D_k| (Algorithm 1, line 26). Not the examples processed: under a step cap every client
    processes the same number, and clients with 200 and 2000 examples would weigh 0.5 / 0.5."""
    total = sum(c.train_size for c in contributions)
    return [c.train_size / total for c in contributions]


@dataclass
class RoundState:
    """Everything one round accumulates, from ``configure_train`` to its results record."""

    number: int
    instructions: Instructions
    started: float = field(default_factory=time.time)
    wanted: int = 0  # training replies to aggregate; fewer than asked when over-selecting
    skipped: str | None = None  # why no node was asked to train
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (mask version, bytes down)
    evaluated: dict[int, int] = field(default_factory=dict)  # node -> mask version sent to evaluate
    # the messages handed to Flower, which gives each its id when it sends it (see `sender`)
    outgoing: list[Message] = field(default_factory=list)
    received: list[int] = field(default_factory=list)  # bytes up of every reply with content
    rejected: list[dict] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)  # asked nodes whose reply never came or came too late
    clients: list[dict] = field(default_factory=list)
    client_eval: dict | None = None
    sparsity: float | None = None
    layer_sparsity: dict[str, float] | None = None
    accuracy_before_adjustment: float | None = None
    bae_norm: tuple[float, float] | None = None  # ‖θ_low‖ of the global model sent and of the aggregate


def _scalar(value: int | float | list[int] | list[float]) -> int | float:
    """A scalar metric value; a list one raises TypeError, as ``int()`` / ``float()`` of it would."""
    if isinstance(value, list):
        raise TypeError(f"expected a number, got a list: {value!r}")
    return value


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


class SparseStrategy(Strategy):
    """Common machinery; subclasses register a method and set its structure policy."""

    method: ClassVar[str]
    mode: ClassVar[Mode]
    registry: ClassVar[dict[str, type[SparseStrategy]]] = {}

    def __init_subclass__(cls, method: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if method is None:  # an intermediate class shares a registered one's method
            return
        if method not in METHODS:
            raise TypeError(f"{cls.__name__}: {method!r} is not in common.methods.METHODS")
        cls.method, cls.mode = method, METHODS[method].mode
        SparseStrategy.registry[method] = cls

    def __init__(
        self,
        cfg: RunConfig,
        template: nn.Module,
        evaluator: Evaluator | None = None,
        max_train_size: int | None = None,
    ):
        self.cfg = cfg
        # the whole training set: no node's |D_k| can exceed it (None: not known, no such check)
        self.max_train_size = max_train_size
        self.train_sizes: dict[int, int] = {}  # |D_k| each node declared in its first reply
        self.evaluator = evaluator  # test accuracy just before a server prune/grow (the paper's Fig. 1)
        self.layout = ModelLayout.of(template)
        full = template.state_dict()
        self.state = {name: full[name].detach().clone().float() for name, _ in self.layout.masked + self.layout.dense}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.masks = self.initial_masks()
        self._prune_state()
        self.mask_version = 0
        self.node_versions: dict[int, int] = {}  # the mask version each node acknowledged
        self.node_keys: dict[int, NodeKey] = {}  # what orders nodes in sampling and aggregation (server/fleet.py)
        self.rounds_before = 0  # rounds a checkpoint had done: Flower counts this start's rounds from 1
        self.round: RoundState | None = None
        self._arrays: ArrayRecord | None = None  # the global model as last handed to Flower
        self._mask_bits: tuple[tuple[int, int], np.ndarray] | None = None  # see _encoded_masks
        self.dense_bytes = 2 * content_bytes(
            RecordDict({"model": to_array_record(pack_values(self.state, self.layout, None))})
        )

    # ---------------------------------------------------------------- policy hooks

    def initial_masks(self) -> Masks:
        """Algorithm 1, line 2: random masks at ``s_tm`` with ERK (or uniform) layer densities."""
        # cfg.density is a str that parse_run_config has checked is one of Distribution's values
        density = cast(Distribution, self.cfg.density)
        return random_masks(self.layout.masked_shapes, self.cfg.param_sparsity, density, self.generator)

    def instructions(self, server_round: int) -> Instructions:
        return round_instructions(self.cfg, server_round, self.mode, self.mask_version)

    def adjustment_counts(self, server_round: int) -> list[int]:
        """ξ_l per masked layer in an adjustment round (cosine schedule of §4.1), else empty."""
        cfg = self.cfg
        if not is_adjustment_round(server_round, cfg.delta_r, cfg.r_stop):
            return []
        counts = adjust_counts(
            self.masks, adjust_fraction(server_round, cfg.local_epochs, cfg.r_stop, cfg.adjust_alpha)
        )
        return [counts[name] for name, _ in self.layout.masked] if any(counts.values()) else []

    def restructure(self, server_round: int, ins: Instructions, contributions: list[Contribution]) -> bool:
        """Change the structure after aggregation; returns whether the mask changed."""
        return False

    # ---------------------------------------------------------------- Flower's strategy interface
    # Flower numbers the rounds of each `start` from 1; a resumed run's round r is Flower's r - rounds_before.

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        """Flower's round loop, on :meth:`over_selecting` ``grid``."""
        return super().start(self.over_selecting(grid), *args, **kwargs)

    def over_selecting(self, grid: Grid) -> Grid:
        """``grid``, except that a round's training messages return at the first replies it wants."""
        return OverSelectingGrid(grid, self._wanted_replies, lambda reply: not reply.has_error())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node. ``arrays`` other than the strategy's own last model (a
        checkpoint handed to ``start``) become the global weights; ``config`` is unused: every setting
        comes from the run config, through :meth:`instructions`."""
        server_round += self.rounds_before
        self.adopt(arrays)
        ins = self.instructions(server_round)
        self.round = RoundState(server_round, ins)
        minimum = self.cfg.min_train_nodes
        connected = wait_for_nodes(grid, minimum, self.cfg.node_wait_timeout)
        if len(connected) < minimum:
            self.round.skipped = (
                f"only {len(connected)} of the min-train-nodes = {minimum} nodes connected within "
                f"node-wait-timeout = {self.cfg.node_wait_timeout:.0f} s: start more SuperNodes or "
                "lower min-train-nodes"
            )
            log(WARNING, "round %d skipped: %s", server_round, self.round.skipped)
            return []
        node_ids, self.round.wanted = self.sample(grid, connected, self.cfg.fraction_train, minimum, "train")
        self.round.outgoing = [self.message_for(node, ins, MessageType.TRAIN) for node in node_ids]
        return self.round.outgoing

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.rounds_before
        state = self._current_round(server_round)
        ins = state.instructions
        accepted: list[Contribution] = []
        for reply in replies:
            node = self.sender(reply)
            if reply.has_error():
                self._reject(node, f"client error: {reply.error.reason}")
                continue
            up = content_bytes(reply.content)
            state.received.append(up)
            try:
                contribution = self.read_reply(node, reply.content, ins)
            except (WireError, KeyError, TypeError, ValueError) as exc:
                self._reject(node, f"malformed reply: {exc}")
                continue
            contribution.metrics.update(bytes_down=state.sent[node][1], bytes_up=up)
            accepted.append(contribution)
        accepted = accepted[: state.wanted]  # over-selected: the first replies to arrive count
        used = {c.node_id for c in accepted} | {r["node_id"] for r in state.rejected}
        state.abandoned = [node for node in state.sent if node not in used]
        # in node order, not arrival order: floating-point sums then do not depend on which node was quicker
        accepted.sort(key=lambda c: self.node_keys.get(c.node_id, node_key(c.node_id, None)))
        accepted = self._within_bounds(accepted)
        for contribution in accepted:
            self.node_versions[contribution.node_id] = state.sent[contribution.node_id][0]
        state.clients = [{"node_id": c.node_id, **c.metrics} for c in accepted]
        log(
            INFO,
            "round %d bytes per client (down/up): %s",
            server_round,
            ", ".join(f"{c.node_id}: {c.metrics['bytes_down']}/{c.metrics['bytes_up']}" for c in accepted),
        )
        if not accepted:
            errors = [r["reason"] for r in state.rejected if r["reason"].startswith("client error: ")]
            if server_round == self.rounds_before + 1 and state.sent and len(errors) == len(state.sent):
                # every node asked failed the first round: a setup error (data, packages, memory),
                # which more rounds would only repeat
                common = max(set(errors), key=errors.count)
                raise FleetError(
                    f"every one of the {len(errors)} nodes asked failed round {server_round}; "
                    f"{errors.count(common)} with {common!r}: fix the nodes, then run again"
                )
            if state.skipped is None:
                log(WARNING, "round %d: no usable reply; the global model stays as it was", server_round)
            return None, None
        marks = self._bae_marks(ins)
        low_start = marked_norm(self._from_centre(), marks) if marks else None
        self.aggregate(accepted)
        if marks:
            # the squeeze that matters is the aggregate's: the server prunes the averaged weights
            state.bae_norm = (cast(float, low_start), marked_norm(self._from_centre(), marks))
        if ins.adjusting and self.evaluator is not None and METHODS[self.method].adjustment == "server-topk":
            # the aggregated model under the old mask; the round's own evaluation is the one after
            _, state.accuracy_before_adjustment = self.evaluator(self.global_state(), self.masks)
        if self.restructure(server_round, ins, accepted):
            self.mask_version += 1
        self._prune_state()
        state.sparsity, state.layer_sparsity = sparsity(self.masks), layer_sparsity(self.masks)
        total = sum(c.examples for c in accepted)
        loss = sum(c.metrics["loss"] * c.examples for c in accepted) / total
        return self.global_arrays(), MetricRecord({"train-loss": loss, "num-examples": total, "clients": len(accepted)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.rounds_before
        if self.cfg.fraction_evaluate == 0.0:
            return []
        state = self._current_round(server_round)
        ins = self.instructions(server_round)
        # no wait: the nodes connected now evaluate, however few
        nodes, _ = self.sample(grid, list(grid.get_node_ids()), self.cfg.fraction_evaluate, 1, "evaluate")
        messages = [self.message_for(node, ins, MessageType.EVALUATE) for node in nodes]
        state.evaluated = {m.metadata.dst_node_id: ins.mask_version for m in messages}
        state.outgoing += messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' validation metrics, averaged with their example counts as weights."""
        state = self._current_round(server_round + self.rounds_before)
        metrics: list[MetricRecord] = []
        for reply in replies:
            node = self.sender(reply)
            if reply.has_error():
                log(WARNING, "round %d: evaluation on node %d failed: %s", server_round, node, reply.error.reason)
                # it may hold any mask now: send the current one next time
                self.node_versions.pop(node, None)
                continue
            self.node_versions[node] = state.evaluated[node]
            metrics.append(reply.content.metric_records["metrics"])
        total = sum(int(_scalar(m["num-examples"])) for m in metrics)
        if not total:
            return None
        keys = [k for k in metrics[0] if k != "num-examples"]
        averaged = MetricRecord(
            {k: sum(float(_scalar(m[k])) * int(_scalar(m["num-examples"])) for m in metrics) / total for k in keys}
        )
        state.client_eval = {**averaged, "num-examples": total}
        return averaged

    def summary(self) -> None:
        log(
            INFO,
            "%s: %d masked layers, sparsity %.4f, mask version %d, dense model %d bytes per client-round",
            type(self).__name__,
            len(self.masks),
            sparsity(self.masks),
            self.mask_version,
            self.dense_bytes,
        )

    def round_record(self) -> dict:
        """The current round as the results log stores it: bytes, clients, rejections, structure."""
        state = self.round
        if state is None:
            raise RuntimeError("no round has been configured yet")
        down = _mean([sent for _, sent in state.sent.values()])
        record = {
            "round": state.number,
            "adjusted": state.instructions.adjusting,
            "rejected": list(state.rejected),
            "clients": list(state.clients),
            "bytes_down": down,
            "bytes_up": _mean(state.received),
            "dense_bytes_per_client": float(self.dense_bytes),
            "bytes_per_client": down + _mean(state.received),
            "round_time_s": time.time() - state.started,
        }
        if state.skipped is not None:
            record["skipped"] = state.skipped
        if state.abandoned:
            record["abandoned"] = list(state.abandoned)
        if state.sparsity is not None:
            record.update(sparsity=state.sparsity, layer_sparsity=state.layer_sparsity)
        if state.client_eval is not None:
            record["client_eval"] = state.client_eval
        if state.accuracy_before_adjustment is not None:
            record["accuracy_before_adjustment"] = state.accuracy_before_adjustment
        if state.bae_norm is not None:
            record["bae_norm_start"], record["bae_norm_end"] = state.bae_norm
        return record

    # ---------------------------------------------------------------- aggregation

    def read_reply(self, node: int, content: RecordDict, ins: Instructions) -> Contribution:
        """Decode and validate one reply; anything off raises WireError/ValueError."""
        metrics = dict(content["metrics"])
        examples = metrics.get("num-examples")
        if not isinstance(examples, int) or examples <= 0:
            raise WireError(f"num-examples must be a positive int, got {examples!r}")
        train_size = metrics.get("train-size")
        if not isinstance(train_size, int) or train_size <= 0:
            raise WireError(f"train-size (the client's |D_k|) must be a positive int, got {train_size!r}")
        if self.max_train_size is not None and train_size > self.max_train_size:
            raise WireError(f"train-size {train_size} exceeds the whole training set ({self.max_train_size})")
        declared = self.train_sizes.setdefault(node, train_size)
        if train_size != declared:
            # its weight in every average: a node cannot grow it after its first reply
            raise WireError(f"train-size {train_size} differs from the {declared} this node declared first")
        # partial batches may count whole: an epoch processes at most train-size + batch-size examples
        if examples > ins.local_epochs * (train_size + ins.batch_size):
            raise WireError(f"num-examples {examples} exceeds {ins.local_epochs} epoch(s) of its {train_size} examples")
        version = metrics.get("mask-version")
        if version != ins.mask_version:
            # its values would land on another mask's positions
            raise WireError(f"trained under mask version {version!r}, but the server sent version {ins.mask_version}")
        loss = metrics.get("train-loss")
        if not isinstance(loss, float) or not math.isfinite(loss):
            raise WireError(f"train-loss must be a finite float, got {loss!r}")
        arrays = from_array_record(content.array_records["model"])
        masks = self.reply_masks(content, ins)
        state = unpack_values(
            arrays, self.layout, None if self.mode != "masked" else (masks or self.masks), ins.wire_format
        )
        topk = None
        if ins.topk and ins.adjusting:
            if "topk" not in content:
                raise WireError("an adjustment round's reply lacks its top-K gradients")
            topk = {
                # with_values=True: every layer comes with its values, never None
                name: (idx, cast(torch.Tensor, val))
                for name, (idx, val) in decode_positions(
                    from_array_record(content.array_records["topk"]), self.layout, "topk", True
                ).items()
            }
            for (name, (idx, _)), count in zip(topk.items(), ins.counts, strict=True):
                if idx.numel() > count or bool(self.masks[name].reshape(-1)[idx].any()):
                    raise WireError(f"top-K of {name!r}: more than {count} entries or an active position")
        client_metrics: dict[str, Any] = {
            "partition_id": metrics.get("partition-id"),
            "examples": examples,
            "train_size": train_size,
            "topk_activation_bytes": metrics.get("topk-activation-bytes"),
            "topk_micro_batch": metrics.get("topk-micro-batch"),
            "loss": metrics["train-loss"],
            "train_time_s": metrics.get("train-time-s"),
            "cpu_time_s": metrics.get("cpu-time-s"),
            "peak_rss_mb": metrics.get("peak-rss-mb"),
            "pid": metrics.get("pid"),
            "rss_mb": metrics.get("rss-mb"),
            "activation_bytes": metrics.get("activation-bytes"),
            "steps": metrics.get("steps"),
            "bae_marked": metrics.get("bae-marked"),
            "bae_norm_start": metrics.get("bae-norm-start"),
            "bae_norm_end": metrics.get("bae-norm-end"),
            "batch_size": metrics.get("batch-size"),
        }
        if "device" in content:
            client_metrics["device"] = dict(content["device"])
        return Contribution(node, examples, train_size, state, masks, topk, client_metrics)

    def _within_bounds(self, contributions: list[Contribution]) -> list[Contribution]:
        """The replies whose influence is bounded (server/bounds.py): an update no further from the
        global model than ``max-update-ratio`` times the other replies' median distance and times the
        model's own norm, and top-K values no larger than that ratio squared times the others' median.

        Squared for the top-K: a reply's largest gradient value is one extreme of a heavy-tailed
        distribution that follows the client's loss, so honest non-IID clients differ far more in it
        than in the distance of their whole update (CIFAR, fedmef without BaE, seed 1, round 12: an
        honest client's peak was beyond 10x the others' median while all distances were within 3.5x
        of theirs). 100x still rejects a 1e30 reply; it bounds, not removes, one client's say in which
        positions grow."""
        factor = self.cfg.max_update_ratio
        topk_factor = factor**2
        distances = [update_distance(c.state, self.state) for c in contributions]
        far = beyond_round(distances, factor)
        limit = factor * state_norm(self.state)
        peaks = [
            max((float(v.abs().max()) for _, v in c.topk.values() if v.numel()), default=0.0) if c.topk else 0.0
            for c in contributions
        ]
        loud = (
            beyond_round(peaks, topk_factor) if all(c.topk is not None for c in contributions) else [False] * len(peaks)
        )
        kept = []
        for c, d, f, p, lo in zip(contributions, distances, far, peaks, loud, strict=True):
            if f or d > limit:
                self._reject(
                    c.node_id,
                    f"update distance {d:.4g} is beyond {factor:g}x the round's other "
                    f"replies (median) or the model's norm ({limit / factor:.4g})",
                )
            elif lo:
                self._reject(
                    c.node_id, f"top-K gradient values up to {p:.4g}, beyond {topk_factor:g}x the round's other replies"
                )
            else:
                c.metrics["update_distance"] = d
                if c.topk is not None:
                    c.metrics["topk_peak"] = p  # its spread across honest clients is what the bound must allow
                kept.append(c)
        return kept

    def reply_masks(self, content: RecordDict, ins: Instructions) -> Masks | None:
        """The structure a reply's values live under when it is not the global mask (FedDST)."""
        return None

    def aggregate(self, contributions: list[Contribution]) -> None:
        """Average weighted by |D_k| (Algorithm 1, line 26); pruned entries are 0 in every reply."""
        weights = data_weights(contributions)
        for name in self.state:
            self.state[name] = sum(c.state[name] * w for c, w in zip(contributions, weights, strict=True))

    # ---------------------------------------------------------------- helpers

    def global_state(self) -> dict[str, torch.Tensor]:
        """The model the clients receive: weights ⊙ mask and the dense tensors."""
        return {name: t * self.masks[name] if name in self.masks else t for name, t in self.state.items()}

    def global_arrays(self) -> ArrayRecord:
        """The global model as Flower carries it; the same object until the model changes."""
        if self._arrays is None:
            self._arrays = ArrayRecord({name: t.contiguous() for name, t in self.global_state().items()})
        return self._arrays

    def adopt(self, arrays: ArrayRecord) -> None:
        """Make ``arrays`` the global weights unless they are the strategy's own last model.

        The keys and shapes must be the model's; pruned positions are zeroed under the current masks.
        """
        if arrays is self._arrays:
            return
        shapes = dict(self.layout.masked + self.layout.dense)
        given = {name: tuple(arrays[name].shape) for name in arrays} if arrays is not None else {}
        if given != {name: tuple(shape) for name, shape in shapes.items()}:
            raise ValueError(
                "the arrays handed to the strategy are not this model's: expected "
                f"{len(shapes)} tensors named as in the model, got {sorted(given)[:5]}..."
            )
        for name in shapes:
            value = torch.from_numpy(arrays[name].numpy().copy()).float()
            if not torch.isfinite(value).all():
                raise ValueError(f"the arrays handed to the strategy hold NaN or Inf in {name!r}")
            self.state[name] = value
        self._prune_state()

    def _prune_state(self) -> None:
        self._arrays = None
        for name, mask in self.masks.items():
            if self.mode == "masked":
                self.state[name] = self.state[name] * mask

    def sample(
        self, grid: Grid, connected: list[int], fraction: float, minimum: int, purpose: str
    ) -> tuple[list[int], int]:
        """(nodes to ask, replies wanted) of this round among ``connected`` (server/fleet.py), after
        asking each node seen for the first time for its partition id, which orders it reproducibly."""
        new = [node for node in connected if node not in self.node_keys]
        if new:
            answers = ask_partition_ids(grid, new, min(self.cfg.round_timeout, IDENTITY_TIMEOUT_S))
            # a node that did not answer is ordered by its id this round and asked again next time
            self.node_keys.update({node: node_key(node, pid) for node, pid in answers.items()})
        keys = {node: self.node_keys.get(node, node_key(node, None)) for node in connected}
        over = self.cfg.over_selection if purpose == "train" else 0.0
        assert self.round is not None  # configure_train / configure_evaluate made it
        return sample_nodes(keys, fraction, minimum, over, self.cfg.seed, self.round.number, purpose)

    def _wanted_replies(self, messages: list[Message]) -> int | None:
        """How many of ``messages``' replies a round aggregates, when they are its over-selected training."""
        if self.round is not None and messages and self.round.outgoing and messages[0] is self.round.outgoing[0]:
            return self.round.wanted  # the round's own training messages come first in `outgoing`
        return None

    # ---------------------------------------------------------------- checkpoints (server/checkpoint.py)

    def checkpoint(self) -> dict[str, Any]:
        """What the strategy needs to go on after its last finished round, as plain tensors and numbers.

        Not the nodes' acknowledged mask versions: a resumed run is a new Flower run, and each node
        starts it with an empty state, so every node is sent the mask again."""
        return {
            "method": self.method,
            "state": {name: t.clone() for name, t in self.state.items()},
            "masks": {name: m.clone() for name, m in self.masks.items()},
            "mask_version": self.mask_version,
            "train_sizes": dict(self.train_sizes),
            "node_keys": {node: list(key) for node, key in self.node_keys.items()},
        }

    def restore(self, saved: dict[str, Any], rounds_done: int) -> None:
        """Take over a :meth:`checkpoint` written after round ``rounds_done``."""
        if saved["method"] != self.method:
            raise ValueError(f"the checkpoint is of strategy {saved['method']!r}, not {self.method!r}")
        shapes = dict(self.layout.masked + self.layout.dense)
        if {n: tuple(t.shape) for n, t in saved["state"].items()} != {n: tuple(s) for n, s in shapes.items()}:
            raise ValueError("the checkpoint's weights are not this model's: was the model or data set changed?")
        self.state = {name: t.float() for name, t in saved["state"].items()}
        self.masks = {name: m.bool() for name, m in saved["masks"].items()}
        self.mask_version = int(saved["mask_version"])
        self.train_sizes = {int(node): int(size) for node, size in saved["train_sizes"].items()}
        self.node_keys = {int(node): (int(key[0]), int(key[1])) for node, key in saved["node_keys"].items()}
        self.node_versions = {}
        self.rounds_before = rounds_done
        self._arrays = None
        self._mask_bits = None

    def message_for(self, node: int, ins: Instructions, message_type: str) -> Message:
        """The message for one node, its sent bytes recorded for the round's results."""
        content = self.content_for(node, ins)
        if message_type == MessageType.TRAIN and self.round is not None:
            self.round.sent[node] = (self.mask_version, content_bytes(content))
        return Message(content=content, dst_node_id=node, message_type=message_type)

    def content_for(self, node: int, ins: Instructions) -> RecordDict:
        """What one node receives: its instructions, the model's values and, if stale, the mask."""
        sparse = self.mode != "dense"
        content = RecordDict(
            {
                "train": ConfigRecord(ins.to_config()),
                "model": to_array_record(
                    pack_values(self.global_state(), self.layout, self.masks if sparse else None, ins.wire_format)
                ),
            }
        )
        if sparse and self.node_versions.get(node) != self.mask_version:
            content["masks"] = to_array_record({"bits": self._encoded_masks()})
        return content

    def _encoded_masks(self) -> np.ndarray:
        """The global mask as it travels, encoded once per mask (ResNet18: 1-3 s a time here), not
        once per node that needs it. Every structure change replaces the masks dict."""
        key = (self.mask_version, id(self.masks))
        if self._mask_bits is None or self._mask_bits[0] != key:
            self._mask_bits = (key, encode_masks(self.masks, self.layout))
        return self._mask_bits[1]

    def _bae_marks(self, ins: Instructions) -> Marks:
        """θ_low as every client marks it on receipt (eq. 2: the ξ smallest active weights of the model
        the server sent), or nothing outside a BaE round."""
        if not (ins.bae and ins.adjusting):
            return {}
        counts = dict(zip(self.masks, ins.counts, strict=True))
        return mark_low(self._from_centre(), self.masks, counts)

    def _from_centre(self) -> dict[str, torch.Tensor]:
        """The masked weights as ``prune-centre`` measures their magnitude: the weights themselves, or
        their distance from their filter's mean (:func:`~common.pruning.masks.filter_centres`)."""
        weights = {name: self.state[name] for name in self.masks}
        return deviations(weights, self._centres(weights))

    def _centres(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return filter_centres(weights, self.masks) if self.cfg.prune_centre == "filter-mean" else None

    def sender(self, reply: Message) -> int:
        """The node a reply answers for. An error reply that Flower makes itself for a node that
        dropped out (or whose reply it could not fetch) comes from the SuperLink, not from that node:
        the message it answers, which Flower gave an id when it sent it, names the node."""
        asked = reply.metadata.reply_to_message_id
        if asked and self.round is not None:
            for message in self.round.outgoing:
                if message.metadata.message_id == asked:
                    return message.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _current_round(self, server_round: int) -> RoundState:
        if self.round is None or self.round.number != server_round:
            raise RuntimeError(f"round {server_round} was not configured by this strategy's configure_train")
        return self.round

    def _reject(self, node: int, reason: str) -> None:
        number = self.round.number if self.round is not None else "?"
        log(WARNING, "round %s: reply from node %d rejected: %s", number, node, reason)
        if self.round is not None:
            self.round.rejected.append({"node_id": node, "reason": reason})
        self.node_versions.pop(node, None)  # resend the mask next time, whatever the node holds


class FedMef(SparseStrategy, method="fedmef"):
    """Random prune, BaE + SAP on the clients, top-K gradients, server prune/grow (Algorithm 1)."""

    def instructions(self, server_round: int) -> Instructions:
        ins = super().instructions(server_round)
        counts = self.adjustment_counts(server_round)
        return replace(ins, counts=counts, topk=bool(counts), bae=bool(counts) and self.cfg.bae_on)

    def restructure(self, server_round: int, ins: Instructions, contributions: list[Contribution]) -> bool:
        if not ins.adjusting:
            return False
        # read_reply rejects a reply without top-K gradients in an adjustment round, so no c.topk is None here
        weighted = [
            (w, cast(dict[str, tuple[torch.Tensor, torch.Tensor]], c.topk))
            for c, w in zip(contributions, data_weights(contributions), strict=True)
        ]
        scores = sum_topk_gradients(weighted, self.layout.masked_shapes)
        counts = dict(zip(self.masks, ins.counts, strict=True))
        weights = {name: self.state[name] for name in self.masks}
        self.masks, new_weights = prune_and_grow(weights, self.masks, scores, counts, self._centres(weights))
        self.state.update(new_weights)
        log(
            INFO,
            "round %d: pruned and grew %d weights per adjustment (sparsity %.4f)",
            server_round,
            sum(counts.values()),
            sparsity(self.masks),
        )
        return True


class FedTiny(FedMef, method="fedtiny"):
    """FedMef's server-side adjustment without BaE and SAP, on the BatchNorm model (config defaults)."""


class FedDST(SparseStrategy, method="feddst"):
    """Clients prune/grow locally mid-round; the server averages over keepers, unions and re-prunes."""

    def instructions(self, server_round: int) -> Instructions:
        counts = self.adjustment_counts(server_round)
        return replace(super().instructions(server_round), counts=counts, adjust_local=bool(counts))

    def reply_masks(self, content: RecordDict, ins: Instructions) -> Masks | None:
        if not ins.adjusting:
            return None
        if "flips" not in content:
            raise WireError("an adjustment round's reply lacks its mask flips")
        flips = decode_positions(from_array_record(content.array_records["flips"]), self.layout, "flips", False)
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
        weights = data_weights(contributions)
        weighted = [
            (w, {n: c.state[n] for n in self.masks}, c.masks or self.masks)
            for c, w in zip(contributions, weights, strict=True)
        ]
        averaged, union = masked_average(weighted)
        keep = {name: int(mask.sum()) for name, mask in self.masks.items()}
        self.masks = magnitude_masks_within(averaged, union, keep)
        for name in self.state:
            self.state[name] = (
                averaged[name]
                if name in averaged
                else sum(c.state[name] * w for c, w in zip(contributions, weights, strict=True))
            )

    def restructure(self, server_round: int, ins: Instructions, contributions: list[Contribution]) -> bool:
        return ins.adjusting


class PQSU(SparseStrategy, method="pqsu"):
    """FL-PQSU: one L1-magnitude prune of the initial model on the server, then a static mask."""

    def initial_masks(self) -> Masks:
        weights = {name: self.state[name] for name, _ in self.layout.masked}
        # cfg.density is a str that parse_run_config has checked is one of Distribution's values
        return magnitude_masks(weights, self.cfg.param_sparsity, cast(Distribution, self.cfg.density))


class DenseFedAvg(SparseStrategy, method="fedavg"):
    """FedAvg on the dense model: every weight travels both ways."""

    def initial_masks(self) -> Masks:
        return {name: torch.ones(shape, dtype=torch.bool) for name, shape in self.layout.masked}


class FedDIP(SparseStrategy, method="feddip"):
    """FedDIP: ERK-random start at s0, error feedback, incremental regularisation, global magnitude
    reconfiguration on the cubic sparsity schedule; dense uploads."""

    def initial_masks(self) -> Masks:
        # cfg.density is a str that parse_run_config has checked is one of Distribution's values
        density = cast(Distribution, self.cfg.density)
        return random_masks(self.layout.masked_shapes, self.cfg.feddip_s0, density, self.generator)

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


def make_strategy(
    cfg: RunConfig, template: nn.Module, evaluator: Evaluator | None = None, max_train_size: int | None = None
) -> SparseStrategy:
    return SparseStrategy.registry[cfg.strategy](cfg, template, evaluator, max_train_size)


missing = set(METHODS) - set(SparseStrategy.registry)
if missing:  # a new entry in the table of methods without its class would fail only when chosen
    raise ImportError(f"methods without a strategy class in server.strategy: {sorted(missing)}")
