"""The table of methods: every federated method and the facts about it that the rest of the system reads.

Config validation (which ``strategy`` values exist, what ``auto`` resolves to, where BaE is allowed),
the server's strategy registry (one class per entry), the clients' training modes and the memory
estimates of appendix 7.2 all read :data:`METHODS`. Adding a method is one entry here plus its
strategy class in :mod:`server.strategy`. This module imports nothing of the project, so every
layer of ``common`` may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["masked", "dense", "error-feedback"]
# masked: train θ ⊙ m, pruned weights held at exactly 0; dense: every weight trains;
# error-feedback: forward/backward on w ⊙ m, the gradient applied to the dense w (FedDIP).
MODES: tuple[Mode, ...] = ("masked", "dense", "error-feedback")

Adjustment = Literal["none", "server-topk", "client", "server-magnitude"]
# none: the mask never changes (PQSU, dense FedAvg); server-topk: clients send top-K gradients of
# pruned positions and the server prunes/grows (FedMef, FedTiny); client: clients prune/grow with a
# dense gradient and send their flips (FedDST); server-magnitude: the server re-prunes the dense
# average by global magnitude (FedDIP).


@dataclass(frozen=True)
class Method:
    """One method's facts. ``norm``, ``sap`` and ``bae`` are what the run config's ``auto`` means."""

    name: str
    norm: str
    sap: bool
    bae: bool
    mode: Mode
    adjustment: Adjustment
    sparse_model: bool  # the client holds a sparse model (appendix 7.2: sparse parameter storage)

    @property
    def needs_gradients(self) -> bool:
        """Whether an adjustment round holds a dense weight gradient on the client (top-K or FedDST)."""
        return self.adjustment in ("server-topk", "client")


# Paper §4.1: the baselines train the usual BatchNorm model; only FedMef has NSConv + SAP + BaE.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fedmef", "nsconv", True, True, "masked", "server-topk", True),
        Method("fedtiny", "batchnorm", False, False, "masked", "server-topk", True),
        Method("feddst", "batchnorm", False, False, "masked", "client", True),
        Method("pqsu", "batchnorm", False, False, "masked", "none", True),
        Method("fedavg", "batchnorm", False, False, "dense", "none", False),
        Method("feddip", "batchnorm", False, False, "error-feedback", "server-magnitude", False),
    )
}
