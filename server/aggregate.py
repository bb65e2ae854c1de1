"""Coordinate-wise aggregation of the sites' arrays: weighted mean, median, trimmed mean."""

from __future__ import annotations

import numpy as np


def aggregate(stack: np.ndarray, weights: np.ndarray, *, method: str, trim_fraction: float = 0.2) -> np.ndarray:
    """stack [S, ...] from S sites, weights [S] -> [...].

    `mean` weights each site by `weights`; `median` and `trimmed_mean` treat sites equally
    and resist a few extreme sites.
    """
    stack = np.asarray(stack, dtype=np.float64)
    if method == "mean":
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), stack, axes=1)
    if method == "median":
        return np.median(stack, axis=0)
    if method == "trimmed_mean":
        # Round up, so that a small federation still drops its extremes, but keep at least one site.
        sites = stack.shape[0]
        cut = min(int(np.ceil(trim_fraction * sites)), (sites - 1) // 2)
        ordered = np.sort(stack, axis=0)
        return ordered[cut : stack.shape[0] - cut].mean(axis=0)
    raise ValueError(f"unknown aggregation {method!r}: use mean, median or trimmed_mean")
