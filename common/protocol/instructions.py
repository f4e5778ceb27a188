"""The per-round instructions the server sends and the client executes, as one typed record.

The client decides no policy: which model to build, how sparse its activations are, whether this is a
BaE round, how many weights per layer move and whether to send top-K gradients all arrive here, in the
``train`` ConfigRecord of each message. Both sides use :class:`Instructions`, so the keys are written
once and a malformed config is rejected with the key that is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

from common.methods import MODES
from common.nn.sapcache import SAP_FORMATS
from common.protocol.config import BAE_PENALTIES, BAE_STEPS, TOPK_PASSES, WIRE_FORMATS, RunConfig, typed_value
from common.pruning.masks import PRUNE_CENTRES
from common.pruning.schedules import round_learning_rate


class ProtocolError(ValueError):
    """A message's instructions are missing a key or hold a value of the wrong type."""


@dataclass(frozen=True)
class Instructions:
    """One round of local work.

    ``mode``: ``masked`` trains ``θ ⊙ m`` with pruned weights held at 0 (FedMef, FedTiny, FedDST,
    PQSU); ``dense`` trains every weight (FedAvg); ``error-feedback`` runs forward/backward on
    ``w ⊙ m`` and applies the gradient to the dense ``w`` (FedDIP). ``counts``: weights that move per
    masked layer in an adjustment round (ξ_l), empty otherwise.
    """

    server_round: int
    model: str
    width: int
    norm: str
    s_ta: float  # < 0: SAP off
    sap_linear: bool
    sap_format: str  # how SAP stores its cached values (common.nn.sapcache)
    wire_format: str  # the precision of the weight values in the reply (common.protocol.wire)
    gamma: float
    mode: str
    mask_version: int
    lr: float
    eta0: float
    momentum: float
    weight_decay: float
    local_epochs: int
    max_local_steps: int
    batch_size: int
    augment: bool
    seed: int  # the round's seed; each client mixes in its own key (:meth:`client_seed`)
    counts: list[int]
    bae: bool
    bae_lambda: float
    bae_step: str
    bae_penalty: str
    prune_centre: str  # where BaE marks and pulls from (common.pruning.masks.PRUNE_CENTRES)
    topk: bool
    grad_batches: int
    topk_pass: str
    adjust_local: bool
    reg_lambda: float

    def client_seed(self, key: int) -> int:
        """The seed of one client's random streams this round (batch order, augmentation, SAP's
        threshold samples): a function of (run seed, round, ``key``), where ``key`` is the client's
        partition id, so it does not depend on which process or node id serves the client."""
        return (self.seed * 1_000_003 + key) % 2**63

    @property
    def act_sparsity(self) -> float | None:
        return self.s_ta if self.s_ta >= 0 else None

    @property
    def adjusting(self) -> bool:
        return bool(self.counts)

    def to_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Instructions:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                raise ProtocolError(f"the server's instructions lack {key!r}; server and client versions differ?")
            try:
                # with `from __future__ import annotations` a field's type is its annotation's text
                kwargs[f.name] = typed_value(key, config[key], cast(str, f.type))
            except TypeError as exc:
                raise ProtocolError(f"instruction {exc}") from exc
        ins = cls(**kwargs)
        if ins.mode not in MODES:
            raise ProtocolError(f"unknown training mode {ins.mode!r}; expected one of {MODES}")
        if ins.topk_pass not in TOPK_PASSES:
            raise ProtocolError(f"unknown top-K pass {ins.topk_pass!r}; expected one of {TOPK_PASSES}")
        if ins.sap_format not in SAP_FORMATS:
            raise ProtocolError(f"unknown SAP cache format {ins.sap_format!r}; expected one of {SAP_FORMATS}")
        if ins.wire_format not in WIRE_FORMATS:
            raise ProtocolError(f"unknown wire format {ins.wire_format!r}; expected one of {tuple(WIRE_FORMATS)}")
        if ins.bae_step not in BAE_STEPS:
            raise ProtocolError(f"unknown BaE step {ins.bae_step!r}; expected one of {BAE_STEPS}")
        if ins.bae_penalty not in BAE_PENALTIES:
            raise ProtocolError(f"unknown BaE penalty {ins.bae_penalty!r}; expected one of {BAE_PENALTIES}")
        if ins.prune_centre not in PRUNE_CENTRES:
            raise ProtocolError(f"unknown prune centre {ins.prune_centre!r}; expected one of {PRUNE_CENTRES}")
        if ins.batch_size < 1 or ins.local_epochs < 1 or ins.lr <= 0:
            raise ProtocolError("batch-size and local-epochs must be >= 1 and lr > 0")
        return ins


def round_instructions(cfg: RunConfig, server_round: int, mode: str, mask_version: int) -> Instructions:
    """Round ``server_round``'s instructions under ``cfg`` as every method's server starts them: no
    adjustment (a method's strategy adds its counts, BaE, top-K, FedDST's or FedDIP's part), the
    round's decayed learning rate and the round's seed."""
    return Instructions(
        server_round=server_round,
        model=cfg.model,
        width=cfg.width,
        norm=cfg.resolved_norm,
        s_ta=cfg.s_ta if cfg.sap_on else -1.0,
        sap_linear=cfg.sap_linear,
        sap_format=cfg.sap_format,
        wire_format=cfg.wire_format,
        gamma=cfg.gamma,
        mode=mode,
        mask_version=mask_version,
        lr=round_learning_rate(cfg.lr, cfg.lr_decay, server_round),
        eta0=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        local_epochs=cfg.local_epochs,
        max_local_steps=cfg.max_local_steps,
        batch_size=cfg.batch_size,
        augment=cfg.augment,
        seed=cfg.seed * 100_003 + server_round,
        counts=[],
        bae=False,
        bae_lambda=cfg.bae_lambda,
        bae_step=cfg.bae_step,
        bae_penalty=cfg.bae_penalty,
        prune_centre=cfg.prune_centre,
        topk=False,
        grad_batches=cfg.grad_batches,
        topk_pass=cfg.topk_pass,
        adjust_local=False,
        reg_lambda=0.0,
    )
