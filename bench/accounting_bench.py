"""A site's noise calibration, with fedistill's accounting against Opacus's own `compute_rdp`:
the noise multiplier a fresh ledger finds for a round (epsilon 3 at delta 1e-5, 100 steps) at
DP-SGD's usual sample rates, timed both ways, side by side, on the same machine in one run.

    python -m bench.accounting_bench [--repeats 3]     (make bench-accounting)

`common/accounting.py` sums Opacus's RDP series term by term as Opacus does, so both ways must
find the same noise multiplier to the bit; the table shows it, and the speed-up.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

from bench.run_bench import ResultsFile
from common import accounting
from common.privacy import Budget, DataFingerprint, PrivacyLedger

SAMPLE_RATES = (0.01, 0.05, 0.1, 0.25)
BUDGET, STEPS, MAX_NOISE = Budget(3.0, 1e-5), 100, 50.0


def opacus_rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                               orders=accounting.ORDERS))


def calibration(folder: Path, sample_rate: float, rdp_per_step) -> tuple[float, float]:
    """(seconds, noise multiplier) of one calibration on a fresh ledger, in a process that has computed
    nothing yet: each noise level tried is computed once, as the ledger's own cache does."""
    ledger = PrivacyLedger(folder, budget=BUDGET, data=DataFingerprint("bench", "whole", "r"))
    original = accounting._rdp_per_step
    accounting._rdp_per_step = functools.lru_cache(maxsize=None)(rdp_per_step)
    try:
        start = time.perf_counter()
        noise = ledger.calibrate(limit=BUDGET, sample_rate=sample_rate, steps=STEPS, max_noise_multiplier=MAX_NOISE)
        return time.perf_counter() - start, noise
    finally:
        accounting._rdp_per_step = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = ResultsFile("bench-accounting.json", budget=BUDGET.epsilon, delta=BUDGET.delta, steps=STEPS,
                          repeats=args.repeats)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedistill-bench-accounting-") as tmp:
        for rate in SAMPLE_RATES:
            ours, theirs, noises = [], [], set()
            for repeat in range(args.repeats):  # alternating, each on an empty cache
                for name, way, times in (("opacus", opacus_rdp_per_step, theirs),
                                         ("fedistill", accounting._rdp_per_step.__wrapped__, ours)):
                    seconds, noise = calibration(Path(tmp) / f"{rate}-{repeat}-{name}", rate, way)
                    times.append(seconds)
                    noises.add(noise)
            rows.append({"sample_rate": rate, "opacus_s": theirs, "fedistill_s": ours, "same_noise": len(noises) == 1,
                         "noise_multiplier": noises.pop() if len(noises) == 1 else sorted(noises),
                         "speedup": statistics.median(theirs) / statistics.median(ours)})
            results.save_rows(rows)
            print(f"sample rate {rate}: done", flush=True)
    print(f"\none calibration: epsilon {BUDGET.epsilon} at delta {BUDGET.delta}, {STEPS} steps, "
          f"median of {args.repeats} (seconds)")
    print(f"{'sample rate':>11} {'noise':>8} {'Opacus':>8} {'fedistill':>10} {'speed-up':>9} {'same noise':>11}")
    for row in rows:
        print(f"{row['sample_rate']:11g} {row['noise_multiplier']:8.4f} {statistics.median(row['opacus_s']):8.2f} "
              f"{statistics.median(row['fedistill_s']):10.2f} {row['speedup']:8.1f}x {str(row['same_noise']):>11}")
    print(f"JSON in {results.path}")
    return 0 if all(row["same_noise"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
