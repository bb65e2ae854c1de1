"""Epsilon of composed DP-SGD steps under Opacus's RDP accountant (add/remove-one adjacency),
the one analysis the ledger calibrates with and checks against."""

from __future__ import annotations

import functools
import warnings

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ORDERS))


def epsilon_of(blocks: list[tuple[float, float, int]], *, delta: float) -> float:
    """Epsilon of composed (noise_multiplier, sample_rate, steps) blocks under Opacus's RDP accountant.

    The same analysis as `RDPAccountant.get_epsilon` with its default orders; RDP is linear
    in the number of steps, so the per-step RDP of each (noise, rate) pair is computed once
    per process, which makes calibration and budget checks cheap.
    """
    if not blocks:
        return 0.0
    rdp = sum(steps * _rdp_per_step(sigma, q) for sigma, q, steps in blocks)
    with warnings.catch_warnings():
        # At very large noise the best RDP order is the largest one tried; the epsilon
        # returned is still a valid (slightly loose) upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)
