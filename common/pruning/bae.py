"""Budget-aware extrusion (BaE), FedMef §3.3, eq. 2-4.

In an adjustment round a client marks theta_low, the active weights the server is about to drop,
trains on ``L + lambda ||theta_low||_2^2`` (eq. 2) so their information moves into the surviving
weights, and uses the learning rate ``mu_t = max(eta_t, beta_t)`` (eq. 4) so the extrusion still
happens when the decayed schedule is small.

The paper's text calls the same term "L_1 regularization of low-magnitude parameters" (§3.2) while
its eq. 2 squares an L2 norm; both are here (``bae-penalty``). They differ where it matters late in
training: the squared norm's pull, ``2 lambda theta``, vanishes with the weight, so marks already near
zero follow the task gradient's noise and grow; the L1 pull, ``lambda sign(theta)``, does not, and its
proximal step (a soft threshold) sets every mark that one step moved by less than ``lambda mu`` to
exactly zero.

theta_low is a subset of the ACTIVE weights. The public FedMef port ranked |w| over the whole
tensor, where the smallest entries are the pruned zeros, so its penalty and its learning-rate
boost were both identically 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from common.pruning.schedules import rex_factor
from common.pruning.topk import layer_tensor, resolve_counts, select_by_magnitude

#: theta_low per layer as ascending flat int64 positions. A client holds the marks through a whole
#: adjustment round, beside training's activations: as a bool mask they were a byte per weight, 10.6 MiB
#: for ResNet18, the excess of its adjustment round's peak over a normal round's (796 against 785 MiB);
#: as positions they are 8 bytes per mark, ξ of them.
Marks = dict[str, Tensor]


def mark_low(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], counts: Mapping[str, int]) -> Marks:
    """theta_low (eq. 2): per layer of ``masks``, the ``counts[l]`` active entries of smallest |w|, as
    their flat positions, ascending (:data:`Marks`; ``indices_to_mask`` makes a mask of them).

    Counts are capped at the layer's active entries; a layer absent from ``counts`` gets no marks.
    Ties go to the lower flat index, so the marks are deterministic.
    """
    marks: Marks = {}
    for name, k in resolve_counts(masks, counts).items():
        mask = masks[name]
        weight = layer_tensor(weights, name, mask, "weights")
        marks[name] = select_by_magnitude(weight, mask, k, largest=False)
    return marks


def _marked(weights: Mapping[str, Tensor], name: str) -> Tensor:
    """Layer ``name``'s weight, flat (a view: the weights are contiguous), to be indexed by its marks."""
    if name not in weights:
        raise ValueError(f"weights have no entry for marked layer {name!r}")
    return weights[name].view(-1)


#: ``bae-penalty``: eq. 2's ``||theta_low||_2^2`` or the text's ``||theta_low||_1``
PENALTIES = ("l2", "l1")


def extrusion_penalty(weights: Mapping[str, Tensor], marks: Marks, penalty: str = "l2") -> Tensor:
    """``||theta_low||_2^2`` (``l2``, eq. 2) or ``||theta_low||_1`` (``l1``) summed over layers,
    differentiable in ``weights``; the surrogate loss is ``loss + lambda * extrusion_penalty(...)``."""
    if penalty not in PENALTIES:
        raise ValueError(f"unknown BaE penalty {penalty!r}; expected one of {PENALTIES}")
    terms = []
    for name, mark in marks.items():
        low = _marked(weights, name)[mark]
        terms.append(low.square().sum() if penalty == "l2" else low.abs().sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def extrusion_prox_(
    weights: Mapping[str, Tensor],
    marks: Marks,
    lam: float,
    lr: float,
    penalty: str = "l2",
    centres: Mapping[str, Tensor] | None = None,
) -> None:
    """One proximal step of the penalty, in place, at step size ``mu`` = ``lr``:

    - ``l2``: ``theta_low <- theta_low / (1 + 2 lambda mu)``, the minimiser of
      ``lambda ||theta||^2 + ||theta - theta'||^2 / (2 mu)``;
    - ``l1``: ``theta_low <- sign(theta_low) max(|theta_low| - lambda mu, 0)``, the soft threshold, the
      minimiser of ``lambda ||theta||_1 + ||theta - theta'||^2 / (2 mu)``.

    Applied after each optimizer step it descends the surrogate objective at the rate ``mu`` of eq. 4,
    with the penalty kept out of the optimizer's momentum. Inside the loss, under SGD with momentum m
    and an optimizer that starts empty every round, the marks follow a heavy ball: once ``2 lambda mu``
    exceeds ``(1 - sqrt(m))^2`` they swing through zero and shrink by at most ``sqrt(m)`` per step, so
    what a client sends depends on where its last step falls in the swing (``python -m
    bench.bae_squeeze``). The proximal step moves them toward zero at every step, never past it.

    With ``centres`` (:func:`~common.pruning.masks.filter_centres`) a layer's marks shrink towards its
    centre instead: ``theta_low - c`` takes the step above."""
    if lam < 0 or lr < 0:
        raise ValueError(f"lambda and the learning rate must be >= 0, got {lam} and {lr}")
    if penalty not in PENALTIES:
        raise ValueError(f"unknown BaE penalty {penalty!r}; expected one of {PENALTIES}")
    with torch.no_grad():
        for name, mark in marks.items():
            flat = _marked(weights, name)
            centre = None
            if centres and name in centres:  # one centre per filter: a mark's filter is its position // its size
                per_filter = flat.numel() // centres[name].numel()
                centre = centres[name].reshape(-1)[mark // per_filter]
            low = flat[mark] if centre is None else flat[mark] - centre
            if penalty == "l2":
                low = low / (1.0 + 2.0 * lam * lr)
            else:
                low = low.sign() * (low.abs() - lam * lr).clamp_min(0.0)
            flat[mark] = low if centre is None else low + centre


def marked_norm(weights: Mapping[str, Tensor], marks: Marks) -> float:
    """``||theta_low||``: the plain L2 norm over all marked weights together (sigma's argument in
    eq. 3)."""
    with torch.no_grad():
        return math.sqrt(float(extrusion_penalty(weights, marks, "l2")))


def budget_lr(eta_t: float, eta0: float, step: int, total_steps: int, low_norm: float) -> float:
    """``mu_t = max(eta_t, beta_t)`` (eq. 4) with ``beta_t = p(t) (2 sigma(||theta_low||) - 1) eta_0``
    (eq. 3); ``step`` of ``total_steps`` BaE steps in this round, ``low_norm`` from
    :func:`marked_norm`."""
    if not eta_t >= 0.0:
        raise ValueError(f"eta_t must be >= 0, got {eta_t}")
    if not eta0 >= 0.0:
        raise ValueError(f"eta0 must be >= 0, got {eta0}")
    if not low_norm >= 0.0:
        raise ValueError(f"low_norm is a norm and must be >= 0, got {low_norm}")
    # 2 sigma(x) - 1 == tanh(x / 2), which does not overflow for a large norm.
    beta = rex_factor(step, total_steps) * math.tanh(low_norm / 2) * eta0
    return max(eta_t, beta)
