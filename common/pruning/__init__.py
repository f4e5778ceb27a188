"""Pruning maths as plain functions on tensors: masks and layer densities, the adjustment and
learning-rate schedules, BaE (eq. 2-4), top-K pruned gradients, prune/grow and the servers' rules."""
