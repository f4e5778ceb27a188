"""The Flower ClientApp: read the server's message, train or evaluate, reply with sparse content.

Message contents (see :mod:`common.protocol.wire`): ``train`` (ConfigRecord, :class:`Instructions`), ``model``
(values in mask order + dense tensors), ``masks`` (only when the node's mask is stale). The node keeps
the last mask it received in ``context.state``, so unchanged masks never travel again. Replies carry
``model``, optional ``topk`` / ``flips`` records and a ``metrics`` MetricRecord with the examples, loss,
train and CPU time, memory of this process and the activation bytes held for backward, and with the
node's first reply a ``device`` ConfigRecord (architecture, cores, memory, Pi temperature/throttling).
A node config ``memory-budget-mb`` makes the client shrink the batch until a step fits, or refuse.

The run config's ``device`` (``auto``: CUDA where this node has it) says where training and evaluation
run; it is not in the instructions because every ClientApp reads the run config anyway and resolves
``auto`` on its own hardware. The wire stays numpy on the CPU: the model comes in there, moves to the
device for the work, and everything that goes back comes back to the CPU first.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from logging import WARNING

import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from torch import nn

from client.data import ClientData, load_client_data, node_config_number
from client.device import device_report, plan_batch_size
from client.trainer import build_local_model, local_train
from common.measure import runtime
from common.nn.training import evaluate
from common.protocol.config import parse_run_config, resolve_device
from common.protocol.instructions import Instructions
from common.protocol.wire import (
    ModelLayout,
    decode_masks,
    encode_positions,
    from_array_record,
    pack_values,
    to_array_record,
    unpack_values,
)
from common.pruning.masks import Masks, load_masks

app = ClientApp()


class StaleMask(RuntimeError):
    """The server sent values for a mask version this node does not hold."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    ins = Instructions.from_config(msg.content["train"])
    cfg = parse_run_config(context.run_config)
    device = resolve_device(cfg.device)
    data = load_client_data(cfg, context.node_config)
    model, layout, masks = _received_model(msg, context, ins, data)
    # planned on the CPU copy: the budget is the node's host memory, which a CPU step's bytes count against
    ins = _fit_memory_budget(model, data, ins, context)
    # a node without a partition id (its own data) keeps its streams apart by its node id
    ins = replace(ins, seed=ins.client_seed(data.partition_id if data.partition_id >= 0 else context.node_id))
    process = psutil.Process()
    cpu_before = sum(process.cpu_times()[:2])
    result = local_train(model.to(device), {name: m.to(device) for name, m in masks.items()}, data.train, ins)
    cpu_time = sum(process.cpu_times()[:2]) - cpu_before
    model.cpu()  # what travels back is numpy, on the CPU
    trained = {name: m.cpu() for name, m in result.masks.items()}

    upload_masks = None if ins.mode in ("dense", "error-feedback") else trained
    content = RecordDict(
        {"model": to_array_record(pack_values(model.state_dict(), layout, upload_masks, ins.wire_format))}
    )
    if ins.adjust_local and ins.adjusting:
        flips = {name: (torch.nonzero((trained[name] != masks[name]).reshape(-1)).reshape(-1), None) for name in masks}
        content["flips"] = to_array_record(encode_positions(flips, layout, "flips"))
    if result.topk is not None:
        topk = {name: (positions.cpu(), values.cpu()) for name, (positions, values) in result.topk.items()}
        content["topk"] = to_array_record(encode_positions(topk, layout, "topk"))
    if "device-reported" not in context.state:  # the device does not change between rounds
        content["device"] = ConfigRecord({**device_report(device)})  # a dict of ConfigRecord's own value type
        context.state["device-reported"] = ConfigRecord({"at": time.time()})
    content["metrics"] = MetricRecord(
        {
            "num-examples": result.examples,
            "train-size": len(data.train),
            "topk-activation-bytes": result.topk_activation_bytes,
            "topk-micro-batch": result.topk_micro_batch,
            "batch-size": ins.batch_size,
            "train-loss": result.loss,
            "steps": result.steps,
            "train-time-s": result.train_time_s,
            "cpu-time-s": cpu_time,
            "rss-mb": process.memory_info().rss / 2**20,
            # the peak of this process over its life (a simulation actor serves many clients, so this is
            # an upper bound there; a SuperNode's ClientApp is one client, in a process per message).
            "peak-rss-mb": runtime.peak_rss_bytes() / 2**20,
            # names the process, so an observer of the node's processes can tell which one served this
            # reply (bench.supernode_memory)
            "pid": os.getpid(),
            "activation-bytes": result.activation_bytes,
            "mask-version": ins.mask_version,
            "partition-id": data.partition_id,
            "finished-at": time.time(),
            "bae-marked": result.marked,
            "bae-norm-start": result.marked_norm_start,
            "bae-norm-end": result.marked_norm_end,
        }
    )
    return Message(content=content, reply_to=msg)


@app.query()
def identity(msg: Message, context: Context) -> Message:
    """The node's partition id (-1: none), which orders it in the server's sampling and aggregation."""
    if "data-path" in context.node_config:  # the id is in the file's metadata
        partition = load_client_data(parse_run_config(context.run_config), context.node_config).partition_id
    else:  # simulation: no need to cut the data set into partitions just to answer
        partition = int(node_config_number(context.node_config, "partition-id", "a whole number", float.is_integer))
    return Message(content=RecordDict({"identity": MetricRecord({"partition-id": partition})}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    ins = Instructions.from_config(msg.content["train"])
    cfg = parse_run_config(context.run_config)
    device = resolve_device(cfg.device)
    data = load_client_data(cfg, context.node_config)
    model, _, _ = _received_model(msg, context, ins, data)
    loss, accuracy = evaluate(model.to(device), data.val)
    metrics = MetricRecord({"num-examples": len(data.val), "eval-loss": loss, "eval-acc": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _fit_memory_budget(model: nn.Module, data: ClientData, ins: Instructions, context: Context) -> Instructions:
    """With a ``memory-budget-mb`` in the node config, shrink the batch until a step fits, or refuse."""
    if "memory-budget-mb" not in context.node_config:
        return ins
    budget = node_config_number(context.node_config, "memory-budget-mb", "a number of MB above 0", lambda mb: mb > 0)
    plan = plan_batch_size(model, data.train.inputs(slice(0, 1)), ins.batch_size, budget)  # MemoryBudgetError: refuse
    if not plan.adapted:
        return ins
    log(
        WARNING,
        "memory budget %.0f MB: batch size %d -> %d (%.0f MB in use + %.0f MB per step)",
        budget,
        ins.batch_size,
        plan.batch_size,
        plan.baseline_mb,
        plan.needed_mb,
    )
    return replace(ins, batch_size=plan.batch_size)


def _received_model(
    msg: Message, context: Context, ins: Instructions, data: ClientData
) -> tuple[nn.Module, ModelLayout, Masks]:
    model = build_local_model(ins, data.num_classes, data.in_channels)
    layout = ModelLayout.of(model)
    masks = _current_masks(msg, context, layout, ins)
    arrays = from_array_record(msg.content.array_records["model"])
    state = unpack_values(arrays, layout, None if ins.mode == "dense" else masks, ins.wire_format)
    model.load_state_dict(state, strict=False)
    load_masks(model, masks)
    return model, layout, masks


def _current_masks(msg: Message, context: Context, layout: ModelLayout, ins: Instructions) -> Masks:
    if ins.mode == "dense":
        return {name: torch.ones(shape, dtype=torch.bool) for name, shape in layout.masked}
    if "masks" in msg.content:
        bits = from_array_record(msg.content.array_records["masks"])["bits"]
        masks = decode_masks(bits, layout)
        context.state["mask"] = to_array_record({"bits": bits})
        context.state["mask-info"] = ConfigRecord({"version": ins.mask_version})
        return masks
    held = context.state["mask-info"]["version"] if "mask-info" in context.state else None
    if held != ins.mask_version:
        raise StaleMask(
            f"the server sent values for mask version {ins.mask_version} without the mask, "
            f"but this node holds version {held!r}; the server resends the mask next round"  # an int or None
        )
    return decode_masks(from_array_record(context.state.array_records["mask"])["bits"], layout)
