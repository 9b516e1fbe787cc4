"""Least-squares fit of DistServe's iteration-time model on *relative* error, non-negative.

Relative error because the planner cares about percentages: an absolute fit would let the
long batches dominate and mispredict short ones by 2x. Non-negative because a negative
coefficient predicts negative times outside the measured range (and the planner's profile
schema refuses it). With three unknowns, trying every subset of columns is exact NNLS.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def fit_relative_nonnegative(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Coefficients β ≥ 0 minimising Σ((Xβ − y)/y)²; features (n, k), times (n,) > 0."""
    if features.ndim != 2 or features.shape[0] != times.shape[0]:
        raise ValueError("features must be (n, k) with one row per measured time")
    if np.any(times <= 0):
        raise ValueError("measured times must be positive")
    weighted = features / times[:, None]
    target = np.ones_like(times)
    best, best_residual = np.zeros(features.shape[1]), float(np.sum(target**2))
    columns = range(features.shape[1])
    for size in range(1, features.shape[1] + 1):
        for subset in combinations(columns, size):
            sub = weighted[:, list(subset)]
            coef, *_ = np.linalg.lstsq(sub, target, rcond=None)
            if np.any(coef < 0):
                continue
            residual = float(np.sum((sub @ coef - target) ** 2))
            if residual < best_residual:
                best_residual = residual
                best = np.zeros(features.shape[1])
                best[list(subset)] = coef
    return best
