"""The run configuration: every hyper-parameter of a run, validated in one place.

Flower hands the ServerApp and the ClientApp ``context.run_config``, a flat mapping built from
``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config`` overrides. :func:`parse_run_config`
turns it into a frozen :class:`RunConfig` and reports every wrong key, type or range at once, with the
accepted values, so a typo in a 300-round experiment fails in the first second, not after an hour.
"""

from __future__ import annotations

import difflib
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import torch

from common.methods import METHODS, Method
from common.nn.models import DEFAULT_WIDTH, MODELS, NORMS, WIDTH_MODELS
from common.nn.nsconv import RELU_GAMMA
from common.nn.sapcache import DEFAULT_SAP_FORMAT, SAP_FORMATS
from common.pruning.bae import PENALTIES as BAE_PENALTIES
from common.pruning.masks import PRUNE_CENTRES

DATASETS = ("fashion-mnist", "cifar10", "cinic10", "tiny-imagenet")
PARTITIONERS = ("dirichlet", "iid")
SWITCH = ("auto", "on", "off")
# The top-K gradient pass: exact activations over micro-batches that hold no more than a SAP step,
# or the SAP layers as they train (approximate gradients, about one batch of memory).
TOPK_PASSES = ("exact", "sap")
# How BaE applies its penalty (common.pruning.bae): in the loss, through the optimizer and its momentum,
# or as the penalty's own proximal step after each optimizer step.
BAE_STEPS = ("loss", "proximal")
# Where the tensors live: every process resolves `auto` on its own hardware (resolve_device).
DEVICES = ("auto", "cpu", "cuda")
# The precision of the weight values on the wire, both ways (common.protocol.wire.pack_values): the
# numpy dtype each format travels as. fp16 halves the bytes; a weight beyond its ±65504 is refused.
WIRE_FORMATS = {"fp32": "float32", "fp16": "float16"}


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """All hyper-parameters; field ``foo_bar`` is run-config key ``foo-bar``.

    The defaults are those of ``[tool.flwr.app.config]`` in ``pyproject.toml`` (the quick CPU preset),
    so a caller passing a partial mapping gets what ``flwr run`` would; a test fails on any difference.
    """

    strategy: str = "fedmef"
    model: str = "lenet5"
    width: int = DEFAULT_WIDTH
    dataset: str = "fashion-mnist"
    data_dir: str = ""
    download: bool = False
    augment: bool = False
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.1
    num_server_rounds: int = 6
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 0.0
    round_timeout: float = 3600.0
    node_wait_timeout: float = 600.0
    over_selection: float = 0.0
    local_epochs: int = 1
    max_local_steps: int = 40
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 0.98
    momentum: float = 0.9
    weight_decay: float = 0.0
    s_tm: float = 0.9
    s_ta: float = 0.9
    density: str = "erk"
    norm: str = "auto"
    sap: str = "auto"
    sap_linear: bool = False
    sap_format: str = DEFAULT_SAP_FORMAT
    wire_format: str = "fp32"
    bae: str = "auto"
    gamma: float = RELU_GAMMA
    delta_r: int = 2
    r_stop: int = 5
    adjust_alpha: float = 0.2
    bae_lambda: float = 0.3
    bae_step: str = "proximal"
    bae_penalty: str = "l1"
    prune_centre: str = "zero"
    grad_batches: int = 4
    topk_pass: str = "exact"
    max_update_ratio: float = 10.0
    feddip_s0: float = 0.5
    feddip_interval: int = 2
    feddip_lambda_max: float = 1e-3
    feddip_lambda_steps: int = 20
    seed: int = 42
    eval_batch_size: int = 512
    max_test_examples: int = 2000
    device: str = "auto"
    results_dir: str = "runs"
    run_name: str = ""
    resume: bool = False

    # -- what the switches resolve to -------------------------------------------------------------
    @property
    def method(self) -> Method:
        return METHODS[self.strategy]

    @property
    def resolved_norm(self) -> str:
        return self.method.norm if self.norm == "auto" else self.norm

    @property
    def sap_on(self) -> bool:
        return self.method.sap if self.sap == "auto" else self.sap == "on"

    @property
    def bae_on(self) -> bool:
        return self.method.bae if self.bae == "auto" else self.bae == "on"

    @property
    def act_sparsity(self) -> float | None:
        """``s_ta`` for the model factory, or None for plain autograd."""
        return self.s_ta if self.sap_on else None

    @property
    def param_sparsity(self) -> float:
        """The target parameter sparsity; dense FedAvg trains every weight."""
        return 0.0 if self.method.mode == "dense" else self.s_tm

    def as_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


_FIELDS = {f.name.replace("_", "-"): f for f in fields(RunConfig)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "float": lambda v: isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "list[int]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
}


def typed_value(key: str, value: Any, kind: str) -> Any:
    """``value`` checked against a dataclass field's type name (str, int, float, bool, list[int]);
    ints are accepted where floats are expected, as TOML and ``--run-config`` write them. A mismatch
    raises TypeError naming the key."""
    if kind == "float" and _is_int(value):
        return float(value)
    if not _CHECKS[kind](value):
        raise TypeError(f"{key} must be a {kind}, got {value!r} ({type(value).__name__})")
    return value


def _range_errors(c: RunConfig) -> list[str]:
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def choice(key: str, value: str, allowed) -> None:
        need(value in allowed, f"{key} = {value!r}: choose one of {', '.join(sorted(allowed))}")

    choice("strategy", c.strategy, METHODS)
    choice("model", c.model, MODELS)
    choice("dataset", c.dataset, DATASETS)
    choice("partitioner", c.partitioner, PARTITIONERS)
    choice("density", c.density, ("erk", "uniform"))
    choice("topk-pass", c.topk_pass, TOPK_PASSES)
    choice("device", c.device, DEVICES)
    need(
        c.max_update_ratio > 1.0,
        f"max-update-ratio = {c.max_update_ratio}: must be > 1 (10 rejects only gross outliers)",
    )
    need(
        c.width == DEFAULT_WIDTH or c.model in WIDTH_MODELS,
        f"width = {c.width}: only {', '.join(WIDTH_MODELS)} take a base width other than {DEFAULT_WIDTH}",
    )
    choice("norm", c.norm, ("auto", *NORMS))
    choice("sap", c.sap, SWITCH)
    choice("sap-format", c.sap_format, SAP_FORMATS)
    choice("wire-format", c.wire_format, tuple(WIRE_FORMATS))
    choice("bae", c.bae, SWITCH)
    choice("bae-step", c.bae_step, BAE_STEPS)
    choice("bae-penalty", c.bae_penalty, BAE_PENALTIES)
    choice("prune-centre", c.prune_centre, PRUNE_CENTRES)
    if c.prune_centre == "filter-mean" and c.strategy in METHODS:
        need(
            c.resolved_norm == "nsconv",
            f"prune-centre = filter-mean: only NSConv standardises filters around their mean, and this run's "
            f"norm is {c.resolved_norm}; use prune-centre = zero, or norm = nsconv",
        )
    for key in ("s-tm", "s-ta", "feddip-s0", "val-fraction"):
        value = getattr(c, key.replace("-", "_"))
        need(0.0 <= value < 1.0, f"{key} = {value}: must be in [0, 1)")
    need(0.0 < c.fraction_train <= 1.0, f"fraction-train = {c.fraction_train}: must be in (0, 1]")
    need(0.0 <= c.fraction_evaluate <= 1.0, f"fraction-evaluate = {c.fraction_evaluate}: must be in [0, 1]")
    for key in (
        "num-server-rounds",
        "local-epochs",
        "batch-size",
        "delta-r",
        "min-train-nodes",
        "feddip-interval",
        "feddip-lambda-steps",
        "eval-batch-size",
        "grad-batches",
        "width",
    ):
        value = getattr(c, key.replace("-", "_"))
        need(value >= 1, f"{key} = {value}: must be >= 1")
    for key in ("max-local-steps", "max-test-examples", "r-stop"):
        value = getattr(c, key.replace("-", "_"))
        need(value >= 0, f"{key} = {value}: must be >= 0 (0 means no limit / no adjustment)")
    for key in ("lr", "dirichlet-alpha", "gamma", "round-timeout", "node-wait-timeout"):
        value = getattr(c, key.replace("-", "_"))
        need(value > 0, f"{key} = {value}: must be > 0")
    need(
        0.0 <= c.over_selection <= 1.0,
        f"over-selection = {c.over_selection}: must be in [0, 1] (0.3 asks 30 % more nodes than it waits for)",
    )
    need(not c.resume or bool(c.run_name), "resume = true needs the run-name of the run to resume")
    need(0.0 < c.lr_decay <= 1.0, f"lr-decay = {c.lr_decay}: must be in (0, 1]")
    for key in ("momentum", "weight-decay", "bae-lambda", "adjust-alpha", "feddip-lambda-max"):
        value = getattr(c, key.replace("-", "_"))
        need(value >= 0, f"{key} = {value}: must be >= 0")
    need(c.adjust_alpha <= 0.5, f"adjust-alpha = {c.adjust_alpha}: must be <= 0.5 (2*alpha of the active weights move)")
    need(
        c.feddip_s0 <= c.s_tm or c.strategy != "feddip",
        f"feddip-s0 = {c.feddip_s0} is above s-tm = {c.s_tm}: FedDIP's sparsity rises from s0 to s-tm",
    )
    if c.strategy in METHODS and c.bae == "on":
        adjusted = [m.name for m in METHODS.values() if m.adjustment == "server-topk"]
        need(
            c.strategy in adjusted,
            f"bae = 'on' needs a method whose server prunes and grows ({', '.join(adjusted)}), not {c.strategy!r}",
        )
    if c.dataset in ("cinic10", "tiny-imagenet"):
        need(bool(c.data_dir), f"dataset {c.dataset!r} is read from an image folder: set data-dir to its path")
    return errors


def parse_run_config(values: Mapping[str, Any]) -> RunConfig:
    """Validate ``context.run_config``; unknown keys, wrong types and ranges all raise one ConfigError."""
    errors: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        f = _FIELDS.get(key)
        if f is None:
            hint = difflib.get_close_matches(key, _FIELDS, n=1)
            errors.append(f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            continue
        try:
            # with `from __future__ import annotations` a field's type is its annotation's text
            kwargs[f.name] = typed_value(key, value, cast(str, f.type))
        except TypeError as exc:
            errors.append(str(exc))
    if not errors:
        errors = _range_errors(RunConfig(**kwargs))
    if errors:
        raise ConfigError(
            "invalid run config (fix [tool.flwr.app.config] or --run-config):\n  - " + "\n  - ".join(errors)
        )
    return RunConfig(**kwargs)


def resolve_device(device: str) -> torch.device:
    """The torch device that the run-config value ``device`` means in this process.

    ``auto`` is CUDA where torch sees a CUDA device and the CPU elsewhere, so the server and every
    client each choose on their own hardware; ``cuda`` insists, and without a CUDA device raises a
    ConfigError that says what to change (raised where it runs: the ServerApp's log, or the client's
    error reply, which the server records and reports when a whole round fails).
    """
    if device not in DEVICES:
        raise ConfigError(f"device = {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        else:  # Ray hides the GPUs from a simulated client that asked for none: CUDA_VISIBLE_DEVICES=''
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = f"torch {torch.__version__} finds no CUDA device (CUDA_VISIBLE_DEVICES={visible!r})"
        raise ConfigError(
            f"device = 'cuda', but {why} on {platform.node()}: set device = 'auto' (CUDA where there is "
            "one, else the CPU) or 'cpu'; or install the CUDA build of torch ('make TORCH=cuda') on a machine "
            "with an NVIDIA GPU; in Flower's simulation give the clients GPUs "
            "('python -m server.simulation --gpus-per-client 0.25')"
        )
    return torch.device("cuda")


def describe_device(device: torch.device) -> str:
    """``cpu``, or a CUDA device with its name and memory, for the results' provenance."""
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    return f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB"
