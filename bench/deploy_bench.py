"""A deployed round against a simulated one: the same two-site, two-round digits federation, on
the same records, submitted to a running loopback deployment (TLS, registered keys, one
`fedistill site` per site) and run by `fedistill simulate`, alternating, side by side.

    python -m bench.deploy_bench [--rounds 2] [--repeats 2]     (make bench-deploy)

Target: the deployed run takes at most 1.5x the simulated one. The deployment's own start
(certificates, coordinator, sites) is paid once per deployment, not per run, and shown apart.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.run_bench import ResultsFile
from common.config import load_config
from common.tasks import build_task
from fedistill.loopback import LoopbackDeployment, fedistill

TARGET = 1.5
SITES = ("site-0", "site-1")


def records(root: Path, cache: str) -> dict[str, Path]:
    """Each simulated site's partition of digits, as the deployed site's own records file."""
    task = build_task(load_config(["task=digits", f"sites={len(SITES)}", f"cache_dir={cache}"]))
    files = {}
    for index, name in enumerate(SITES):
        images, labels = task.private_data(index, len(SITES)).tensors
        files[name] = root / f"{name}.npz"
        np.savez(files[name], images=images[:, 0].numpy(), labels=labels.numpy())
    return files


def timed(run) -> float:
    start = time.perf_counter()
    done: subprocess.CompletedProcess = run()
    if done.returncode != 0:
        raise RuntimeError(f"the run failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    # epsilon 1 of each site's 8 per run: the deployed sites' ledgers last every repeat
    run = ["task=digits", f"sites={len(SITES)}", f"rounds={args.rounds}", f"federation.min_sites={len(SITES)}",
           "privacy.epsilon=1"]
    results = ResultsFile("bench-deploy.json", rounds=args.rounds, repeats=args.repeats, target=TARGET)
    with tempfile.TemporaryDirectory(prefix="fedistill-bench-deploy-") as tmp:
        root = Path(tmp)
        cache = str(root / "cache")
        files = records(root, cache)
        fedistill("assets", "task=digits", f"cache_dir={cache}")  # fits the teacher once, outside the timings
        # The same code both ways, unpinned; no reply held back (reply_after_s pads a round to a
        # wall-clock bound the site chooses, which would measure that bound, not Flower's overhead).
        policy = {"epsilon": 8.0, "cache_dir": cache, "task_sources": ["digits"], "allow_unpinned_apps": True,
                  "reply_after_s": 0}
        start = time.perf_counter()
        with LoopbackDeployment(root / "deployment", {name: {**policy, "data_path": str(files[name])}
                                                      for name in SITES}) as deployment:
            startup = time.perf_counter() - start
            simulated, deployed = [], []
            for repeat in range(args.repeats):
                simulated.append(timed(lambda: fedistill(
                    "simulate", *run, f"run_dir={root / f'sim-{repeat}'}", f"cache_dir={cache}", timeout=1800)))
                deployed.append(timed(lambda: deployment.submit(*run, timeout=1800)))
                print(f"repeat {repeat + 1}: simulated {simulated[-1]:.1f} s, deployed {deployed[-1]:.1f} s", flush=True)
    ratio = statistics.mean(deployed) / statistics.mean(simulated)
    rows = [{"mode": "simulated (fedistill simulate)", "seconds": simulated},
            {"mode": "deployed (fedistill submit, TLS, 2 sites)", "seconds": deployed}]
    results.save_rows(rows)
    results["deployment_startup_s"] = startup
    results["ratio"] = ratio
    print(f"\n{args.rounds} rounds of task=digits, {len(SITES)} sites, {args.repeats} repeats alternating")
    print(f"{'mode':44} {'wall s (mean)':>14} {'each':>16}")
    for row in rows:
        print(f"{row['mode']:44} {statistics.mean(row['seconds']):14.1f} "
              f"{' '.join(f'{s:.1f}' for s in row['seconds']):>16}")
    print(f"deployed / simulated: {ratio:.2f}x (target at most {TARGET}x: {'met' if ratio <= TARGET else 'MISSED'})")
    print(f"deployment start-up, once: {startup:.1f} s; JSON in {results.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
