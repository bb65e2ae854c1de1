"""The site privacy ledger: every DP step a site takes on its data, kept on the site's disk.

The ledger outlives rounds, runs and process restarts (Flower's `context.state` lives only
for one run, in memory, so it cannot be the ledger). It owns the site's privacy state:
how much epsilon is spent, the noise a round needs to stay within the budget, and the
atomic reservation of a round's steps before they are taken. Calibration and checks use
one accountant (Opacus's RDP), so what is calibrated is what is checked.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.storage import atomic_write

LEDGER_FILE = "ledger.json"
LEDGER_FORMAT = "fedistill-privacy-ledger"
LEDGER_VERSION = 1
ACCOUNTANT = "rdp"


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (unreadable, corrupt, or kept under other terms)."""


class BudgetExhausted(RuntimeError):
    """The site's remaining budget cannot cover the requested DP steps."""


@dataclass(frozen=True)
class LedgerEntry:
    """A block of DP-SGD steps with one noise multiplier and one sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    run: str
    round: int
    time: float

    @property
    def accountant_step(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


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


class PrivacyLedger:
    """A site's privacy ledger in `directory` (created if missing) for a fixed delta.

    A ledger kept under a different delta or accountant is refused: composing budgets
    across different deltas would silently change the guarantee.
    """

    def __init__(self, directory: Path | str, *, delta: float):
        self.directory = Path(directory)
        self.path = self.directory / LEDGER_FILE
        self.delta = delta
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget: float | None = None  # fixed by the first reservation, never raised
        self.entries = self._read()

    # -- queries ----------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def noise_of_run(self, run: str) -> float | None:
        """The noise multiplier this ledger recorded for `run`, or None if the run took no steps."""
        noises = [e.noise_multiplier for e in self.entries if e.run == run]
        return noises[-1] if noises else None

    def epsilon_spent(self) -> float:
        return epsilon_of([e.accountant_step for e in self.entries], delta=self.delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site would have spent after `steps` more steps."""
        history = [e.accountant_step for e in self.entries]
        return epsilon_of(history + [(noise_multiplier, sample_rate, steps)], delta=self.delta)

    def calibrate(
        self, *, budget: float, sample_rate: float, steps: int, max_noise_multiplier: float, tolerance: float = 1e-4
    ) -> float:
        """The smallest noise multiplier (to `tolerance`) with which `steps` more steps stay within `budget`.

        Raises BudgetExhausted when even `max_noise_multiplier` would exceed the budget.
        """
        if steps <= 0:
            raise ValueError(f"steps must be > 0, got {steps}")
        self._check_budget(budget)
        spent = self.epsilon_spent()
        if spent >= budget:
            raise BudgetExhausted(f"epsilon spent {spent:.4g} has reached the budget {budget:.4g}")

        def eps(sigma: float) -> float:
            return self.epsilon_after(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)

        if eps(max_noise_multiplier) > budget:
            raise BudgetExhausted(
                f"epsilon spent {spent:.4g} of budget {budget:.4g}: {steps} more steps at sample rate "
                f"{sample_rate:.4g} would exceed it even with noise multiplier {max_noise_multiplier} "
                "(privacy.max_noise_multiplier)"
            )
        low, high = 0.0, max_noise_multiplier  # eps(low) > budget >= eps(high); eps falls as sigma grows
        while high - low > tolerance * high:
            mid = (low + high) / 2
            if mid > 0 and eps(mid) <= budget:
                high = mid
            else:
                low = mid
        return high

    # -- the one mutation -------------------------------------------------------------

    def reserve(
        self, *, budget: float, noise_multiplier: float, sample_rate: float, steps: int, run: str, round: int
    ) -> float:
        """Record `steps` DP steps before they are taken, refusing if they would exceed `budget`.

        The ledger is re-read under an exclusive lock so that concurrent processes on one
        site cannot both spend the same remaining budget. Returns epsilon spent afterwards.
        """
        entry = LedgerEntry(noise_multiplier, sample_rate, steps, run, round, time.time())
        with self._locked():
            self.entries = self._read()
            self._check_budget(budget)
            after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
            if after > budget:
                raise BudgetExhausted(
                    f"{steps} steps at noise multiplier {noise_multiplier:.4g} would bring epsilon to "
                    f"{after:.4g}, over the budget {budget:.4g}"
                )
            self._write(self.entries + [entry], budget)
            self.entries.append(entry)
            self.budget = budget
        return after

    def _check_budget(self, budget: float) -> None:
        """A site's budget covers everything it ever does with its data: it cannot be raised later."""
        if self.budget is not None and budget != self.budget:
            raise LedgerError(
                f"{self.path} is kept for a total budget of epsilon {self.budget:g}, but this run asks for "
                f"{budget:g}: a budget cannot be changed once spending has started; set privacy.epsilon="
                f"{self.budget:g} or give this run its own privacy.ledger_dir"
            )

    # -- storage ----------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / (LEDGER_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        fix = f"move {self.path} aside only if you know what it recorded; a new ledger starts at epsilon 0"
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("format") != LEDGER_FORMAT or doc.get("version") != LEDGER_VERSION:
                raise LedgerError(f"{self.path} is not a version-{LEDGER_VERSION} fedistill privacy ledger; {fix}")
            if doc.get("accountant") != ACCOUNTANT or doc.get("delta") != self.delta:
                raise LedgerError(
                    f"{self.path} was kept with accountant {doc.get('accountant')!r} and delta {doc.get('delta')}, "
                    f"but this run uses {ACCOUNTANT!r} and delta {self.delta}: set privacy.delta={doc.get('delta')} "
                    "or give this run its own privacy.ledger_dir"
                )
            entries = [LedgerEntry(**e) for e in doc["entries"]]
            self.budget = float(doc["budget"]) if entries else None
        except LedgerError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable or corrupt ({err}); {fix}") from None
        for e in entries:
            if not (e.noise_multiplier > 0 and 0 < e.sample_rate <= 1 and e.steps > 0 and math.isfinite(e.noise_multiplier)):
                raise LedgerError(f"privacy ledger {self.path} holds an impossible entry {e}; {fix}")
        return entries

    def _write(self, entries: list[LedgerEntry], budget: float) -> None:
        doc = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "accountant": ACCOUNTANT,
            "delta": self.delta,
            "budget": budget,
            "entries": [asdict(e) for e in entries],
        }
        atomic_write(self.path, json.dumps(doc, indent=1).encode(), durable=True)
