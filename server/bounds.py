"""Bounded influence of any one reply: the rules that keep a malformed or hostile reply out of the
aggregate, as plain functions of the round's replies.

A reply is rejected, not clipped: a reply that moves the model ten times further than the round's
other replies, or by ten times the model's own norm, is not an honest update with some noise in it,
and a clipped one would still let its sender push the model by the whole allowance every round.
Rejected, it leaves exactly the aggregate of the honest replies, and the round goes on.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def update_distance(reply: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """``||theta_k - theta||_2`` over every tensor of ``reference`` (a full-shape state)."""
    total = 0.0
    for name, value in reference.items():
        total += float(torch.sum((reply[name].double() - value.double()) ** 2))
    return math.sqrt(total)


def state_norm(state: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum(v.double() ** 2)) for v in state.values()))


def others_medians(values: Sequence[float]) -> list[float | None]:
    """For each value, the median of the other values of the round; None for a lone value. Leaving the
    value itself out matters with two replies: the median of {honest, 1e30} would be 5e29."""
    return [
        statistics.median([v for j, v in enumerate(values) if j != k]) if len(values) > 1 else None
        for k in range(len(values))
    ]


def beyond_round(values: Sequence[float], factor: float) -> list[bool]:
    """Which values exceed ``factor`` times the median of the round's other values (never where that
    median is 0: then there is no scale to compare with)."""
    return [m is not None and m > 0 and v > factor * m for v, m in zip(values, others_medians(values), strict=True)]
