"""Epsilon of composed DP-SGD steps under Opacus's RDP accountant (add/remove-one adjacency),
the one analysis the ledger calibrates with and checks against."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import special

ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
_STOP = -30.0  # where Opacus's series for a fractional order stops: both terms below exp(-30)
_BLOCK = 64  # terms of that series computed together, before they are summed one by one


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """Opacus's `_compute_log_a_for_frac_alpha`, to the bit: the same terms, summed in the same
    order with Opacus's own `_log_add` and `_log_sub`, up to the same last term. The terms'
    special functions (binomial coefficient, log of the normal CDF) are computed for a block of
    terms at once: one at a time, as Opacus does, they took most of a calibration's time."""
    log_a0, log_a1 = -np.inf, -np.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q, twice_variance = math.log(q), math.log(1 - q), 2 * (sigma**2)
    first = 0
    while True:
        block = np.arange(first, first + _BLOCK)  # Opacus's `_log_erfc` works on arrays as on numbers
        coefs = special.binom(alpha, block)
        log_e0s = math.log(0.5) + rdp_analysis._log_erfc((block - z0) / (math.sqrt(2) * sigma))
        log_e1s = math.log(0.5) + rdp_analysis._log_erfc((z0 - (alpha - block)) / (math.sqrt(2) * sigma))
        for i, coef, log_e0, log_e1 in zip(block.tolist(), coefs.tolist(), log_e0s.tolist(), log_e1s.tolist()):
            log_coef = math.log(abs(coef))
            j = alpha - i
            log_s0 = log_coef + i * log_q + j * log_1q + (i * i - i) / twice_variance + log_e0
            log_s1 = log_coef + j * log_q + i * log_1q + (j * j - j) / twice_variance + log_e1
            if coef > 0:
                log_a0, log_a1 = rdp_analysis._log_add(log_a0, log_s0), rdp_analysis._log_add(log_a1, log_s1)
            else:
                log_a0, log_a1 = rdp_analysis._log_sub(log_a0, log_s0), rdp_analysis._log_sub(log_a1, log_s1)
            if max(log_s0, log_s1) < _STOP:
                return rdp_analysis._log_add(log_a0, log_a1)
        first += _BLOCK


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """Opacus's `_compute_log_a_for_int_alpha`, to the bit, its binomial coefficients computed together."""
    log_a = -np.inf
    log_q, log_1q, twice_variance = math.log(q), math.log(1 - q), 2 * (sigma**2)
    for i, coef in enumerate(special.binom(alpha, np.arange(alpha + 1)).tolist()):
        term = math.log(coef) + i * log_q + (alpha - i) * log_1q + (i * i - i) / twice_variance
        log_a = rdp_analysis._log_add(log_a, term)
    return float(log_a)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's `compute_rdp(q=sample_rate, noise_multiplier, steps=1, orders=ORDERS)`, to the bit."""
    if not (0 < sample_rate < 1 and noise_multiplier > 0):  # Opacus's closed forms for these
        return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                   orders=ORDERS))
    return np.array([(_log_a_integer(sample_rate, noise_multiplier, int(order)) if float(order).is_integer() else
                      _log_a_fractional(sample_rate, noise_multiplier, order)) / (order - 1) for order in ORDERS])


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


def least_noise(enough: Callable[[float], bool], most: float, *, tolerance: float = 1e-4) -> float:
    """The smallest noise multiplier in (0, `most`] (to `tolerance`) that is `enough`, by bisection:
    `enough(most)` holds, and more noise never spends more."""
    low, high = 0.0, most  # too little noise at low, enough at high
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if mid > 0 and enough(mid):
            high = mid
        else:
            low = mid
    return high
