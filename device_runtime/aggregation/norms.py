"""Norm bounds applied by the client half: zeroing (TFF's zeroing_factory) and L2 clipping."""

from __future__ import annotations

import math

import numpy as np


def global_norm(x: np.ndarray, order: float) -> float:
    """The norm of the whole update (all tensors flattened): order 1, 2 or inf."""
    if math.isinf(order):
        return float(np.max(np.abs(x))) if x.size else 0.0
    if order == 1.0:
        return float(np.sum(np.abs(x, dtype=np.float64)))
    if order == 2.0:
        return float(np.sqrt(np.dot(x.astype(np.float64), x.astype(np.float64))))
    raise ValueError(f"norm order must be 1, 2 or inf, got {order}")


def clip_l2(x: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """x scaled onto the L2 ball of radius `bound`; and whether it had to be scaled."""
    norm = global_norm(x, 2.0)
    if norm <= bound:
        return x, False
    return (x * (bound / norm)).astype(np.float32), True
