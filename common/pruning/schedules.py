"""Round, learning-rate and regularisation schedules of FedMef (§3.3, Alg. 1) and FedDIP.

Rounds are 1-based (Flower's ``server_round``). FedMef counts its adjustment schedule in local
epochs: after round r, ``t = r * E`` epochs are done.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from common.pruning.masks import _check_fraction


def is_adjustment_round(server_round: int, delta_r: int, r_stop: int) -> bool:
    """Alg. 1, lines 8/17/27: masks are adjusted every ``delta_r`` rounds up to ``r_stop``."""
    _check_round(server_round)
    if delta_r < 1:
        raise ValueError(f"delta_r must be >= 1 round, got {delta_r}")
    if r_stop < 0:
        raise ValueError(f"r_stop must be >= 0, got {r_stop}")
    return server_round % delta_r == 0 and server_round <= r_stop


def adjust_fraction(server_round: int, local_epochs: int, r_stop: int, alpha: float = 0.2) -> float:
    """Cosine adjustment rate ``zeta_t = alpha (1 + cos(pi t / (R_stop E)))``, t = r * E
    (§4 setup and App. 7.4, alpha = 0.2); 0 once ``t >= R_stop E``.

    ``alpha`` is limited to [0, 0.5] so that ``zeta_t <= 1``: no layer can swap more than it holds.
    """
    _check_round(server_round)
    if local_epochs < 1:
        raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
    if r_stop < 0:
        raise ValueError(f"r_stop must be >= 0, got {r_stop}")
    if not 0.0 <= alpha <= 0.5:
        raise ValueError(f"alpha must lie in [0, 0.5] (zeta_t = alpha(1 + cos) must stay <= 1), got {alpha}")
    t, horizon = server_round * local_epochs, r_stop * local_epochs
    if t >= horizon:
        return 0.0
    return alpha * (1.0 + math.cos(math.pi * t / horizon))


def adjust_counts(masks: Mapping[str, Tensor], fraction: float) -> dict[str, int]:
    """``xi_l = floor(fraction * n_l)`` with n_l the active entries of layer l (Alg. 1 input
    ``xi_t^l``), capped at the layer's pruned entries, since each dropped weight is replaced by a
    grown one. ``fraction <= 1`` keeps ``xi_l <= n_l``.
    """
    _check_fraction(fraction, "fraction")
    counts: dict[str, int] = {}
    for name, mask in masks.items():
        active = int(torch.count_nonzero(mask))
        counts[name] = min(math.floor(fraction * active), mask.numel() - active)
    return counts


def round_learning_rate(eta0: float, decay: float, server_round: int) -> float:
    """``eta_0 * decay^(r - 1)``: the paper's eta_0 = 1 decaying by 0.95 per round (§4)."""
    _check_round(server_round)
    if not eta0 >= 0.0:
        raise ValueError(f"eta0 must be >= 0, got {eta0}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must lie in (0, 1], got {decay}")
    return eta0 * decay ** (server_round - 1)


def rex_factor(step: int, total_steps: int) -> float:
    """REX budget factor ``p(t) = (2T - 2t) / (2T - t)`` of eq. 3: 1 at t = 0, 0 at t = T."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must lie in [0, total_steps={total_steps}], got {step}")
    return (2 * total_steps - 2 * step) / (2 * total_steps - step)


def feddip_sparsity(server_round: int, total_rounds: int, s0: float, s_target: float) -> float:
    """FedDIP's cubic sparsity ramp ``s_t = s_p + (s_0 - s_p)(1 - t/T)^3``, t = round in [0, T]."""
    _check_fraction(s0, "s0")
    _check_fraction(s_target, "s_target")
    t = _clip_round(server_round, total_rounds)
    return s_target + (s0 - s_target) * (1.0 - t / total_rounds) ** 3


def feddip_lambda(
    server_round: int,
    total_rounds: int,
    lambda_max: float,
    steps: int = 20,
    first_nonzero: float | None = None,
) -> float:
    """FedDIP's incremental regularisation: T rounds split into ``steps`` equal stages (stage q
    covers ``q T/steps <= t < (q+1) T/steps``, t = round clipped to [0, T], the last stage also
    t = T). Stage 0 has no regularisation; stages 1..steps-1 rise linearly from ``first_nonzero``
    to ``lambda_max``. The default ``first_nonzero = lambda_max / 2`` is the official code's
    0, 5e-4, ..., 1e-3 for lambda_max = 1e-3 (the paper's q * lambda_max / Q never reaches
    lambda_max).
    """
    t = _clip_round(server_round, total_rounds)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (stage 0 is unregularised), got {steps}")
    if not lambda_max >= 0.0:
        raise ValueError(f"lambda_max must be >= 0, got {lambda_max}")
    first = lambda_max / 2 if first_nonzero is None else first_nonzero
    if not 0.0 <= first <= lambda_max:
        raise ValueError(f"first_nonzero must lie in [0, lambda_max={lambda_max}], got {first_nonzero}")
    stage = min(t * steps // total_rounds, steps - 1)
    if stage == 0:
        return 0.0
    if stage == steps - 1:
        return lambda_max
    return first + (lambda_max - first) * (stage - 1) / (steps - 2)


def _check_round(server_round: int) -> None:
    if server_round < 1:
        raise ValueError(f"server_round is 1-based and must be >= 1, got {server_round}")


def _clip_round(server_round: int, total_rounds: int) -> int:
    if total_rounds < 1:
        raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
    return min(max(server_round, 0), total_rounds)
