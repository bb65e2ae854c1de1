"""What a round costs as the federation grows: `fedistill simulate` with 10, 100 and 1,000 virtual
sites, 10% of them sampled per round, beside Flower's plain FedAvg (bench/plain-fedavg/, a Flower
app) on the same simulation engine, records, student and steps, alternating, in one run.

Each size also runs fedistill without DP, which
separates the cost of DP-SGD from that of fedistill's own machinery. Per setting: wall time per round (median over the rounds after the first, each from one round's
end to the next, evaluation included), start-up (from the command to the first round's start),
and peak memory: the proportional set size (PSS) of every process of the run together, sampled
twice a second. The built-in tasks hold too few records for 1,000 sites of 8 or more, so the
records are shared as the README's scale section says (`task.sites_per_record`), the same for
both systems.

    python -m bench.scale_bench [--sites 10 100 1000] [--rounds 4] [--task digits]   (make bench-scale)

Targets (a 2-core machine): 1,000 sites at most 15 s per round and 2 GB peak, and at most 1.5x
plain FedAvg's time per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.run_bench import ResultsFile
from common.config import load_config
from common.partition import sites_per_record_needed
from common.tasks import build_task
from fedistill.processes import processes_using
from fedistill.simulation import SimulationSuperLink

PLAIN_APP = Path(__file__).parent / "plain-fedavg"
FRACTION = 0.1
TARGET_ROUND_S, TARGET_PEAK_GB, TARGET_RATIO = 15.0, 2.0, 1.5
# The same run without DP (the sites' policy must allow it): what fedistill's own machinery costs
# (requests, policy, ledger, checks, distillation), apart from DP-SGD's per-sample gradients.
NO_DP = ["privacy=none", "site.require_dp=false"]


class Poller:
    """`with Poller(every) as poller:` calls `poll()` every `every` seconds in a thread until the block ends."""

    def __init__(self, every: float):
        self.every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.every):
            self.poll()

    def poll(self) -> None:
        raise NotImplementedError


class PeakMemory(Poller):
    """Samples the summed PSS of `root`'s process tree and of every process whose FLWR_HOME lies
    in `folder` (Ray's re-parented workers); `peak` is the largest sum seen."""

    def __init__(self, root: int, folder: Path, every: float = 0.5):
        super().__init__(every)
        self.root, self.folder, self.peak = root, folder, 0

    def poll(self) -> None:
        family: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.root)
            family = {p.pid: p for p in [root, *root.children(recursive=True)]}
        family.update({p.pid: p for p in processes_using(self.folder)})
        total = 0
        for proc in family.values():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_full_info().pss
        self.peak = max(self.peak, total)


class RoundEnds(Poller):
    """Notes when each round is first seen to have ended (`count()`: how many have)."""

    def __init__(self, count, every: float = 0.1):
        super().__init__(every)
        self.count, self.times = count, []

    def poll(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            seen = self.count()
            self.times += [time.time()] * (seen - len(self.times))


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def summarise(launched: float, round_ends: list[float], rounds: int, peak: int) -> dict:
    if len(round_ends) < rounds:
        raise RuntimeError(f"only {len(round_ends)} of {rounds} rounds ended")
    per_round = statistics.median(b - a for a, b in zip(round_ends, round_ends[1:]))
    return {"round_s": per_round, "startup_s": round_ends[0] - per_round - launched, "peak_gb": peak / 2**30}


def run_fedistill(overrides: list[str], rounds: int, workdir: Path, name: str) -> dict:
    run_dir = workdir / name
    command = [sys.executable, "-m", "fedistill.cli", "simulate", *overrides, f"run_dir={run_dir}"]
    launched = time.time()
    with open(workdir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            with PeakMemory(proc.pid, run_dir) as peak, RoundEnds(lambda: lines(run_dir / "metrics.jsonl")) as ends:
                code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    if code != 0:
        raise RuntimeError(f"fedistill simulate exited {code}; see {workdir / f'{name}.log'}")
    trained = [json.loads(line)["sites_trained"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**summarise(launched, ends.times, rounds, peak.peak), "sites_trained": trained}


def run_plain(overrides: list[str], rounds: int, sites: int, cpus_per_site: int, workdir: Path) -> dict:
    home = workdir / "plain"
    home.mkdir()
    timings = home / "timings.json"
    run_config = home / "run_config.toml"
    run_config.write_text(f"overrides = {json.dumps(shlex.join(overrides))}\ntimings = {json.dumps(str(timings))}\n")

    def round_ends() -> int:  # the first entry is FedAvg's evaluation before round 1
        return max(0, len(json.loads(timings.read_text())["round_ends"]) - 1) if timings.exists() else 0

    launched = time.time()
    with SimulationSuperLink(home) as link, PeakMemory(link.superlink.process.pid, home) as peak, \
            RoundEnds(round_ends) as ends:
        code = link.run(PLAIN_APP, run_config, num_supernodes=sites, cpus_per_site=cpus_per_site, echo=lambda line: None)
    if code != 0:
        raise RuntimeError(f"flwr run of the plain FedAvg app exited {code}; see {home / 'flower.log'}")
    return summarise(launched, ends.times, rounds, peak.peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--task", choices=["digits", "mnist"], default="digits", help="a built-in task")
    parser.add_argument("--cpus-per-site", type=int, default=2, help="federation.cpus_per_site, for both systems")
    parser.add_argument("--out", default="bench-scale.json", help="file name under bench/results/")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: a round's time is measured from one round's end to the next")
    results = ResultsFile(args.out, task=args.task, rounds=args.rounds, fraction_train=FRACTION,
                          targets={"round_s": TARGET_ROUND_S, "peak_gb": TARGET_PEAK_GB, "ratio": TARGET_RATIO},
                          cpus=psutil.cpu_count())
    private_records = len(build_task(load_config([f"task={args.task}"])).private_data(0, 1))
    rows = []
    for sites in args.sites:
        share = sites_per_record_needed(private_records, sites)
        overrides = [f"task={args.task}", f"sites={sites}", f"rounds={args.rounds}", f"task.sites_per_record={share}",
                     f"federation.fraction_train={FRACTION}", f"federation.cpus_per_site={args.cpus_per_site}"]
        with tempfile.TemporaryDirectory(prefix="fedistill-scale-") as tmp:
            print(f"{sites} sites (sites_per_record={share}): fedistill simulate ...", flush=True)
            ours = run_fedistill(overrides, args.rounds, Path(tmp), "fedistill")
            print(f"{sites} sites: fedistill simulate without DP ...", flush=True)
            no_dp = run_fedistill([*overrides, *NO_DP], args.rounds, Path(tmp), "fedistill-no-dp")
            print(f"{sites} sites: plain FedAvg ...", flush=True)
            plain = run_plain(overrides, args.rounds, sites, args.cpus_per_site, Path(tmp))
        rows.append({"sites": sites, "sites_per_record": share, "fedistill": ours, "fedistill_no_dp": no_dp,
                     "plain_fedavg": plain, "ratio": ours["round_s"] / plain["round_s"],
                     "ratio_no_dp": no_dp["round_s"] / plain["round_s"]})
        results.save_rows(rows)
    print_table(rows)
    print(f"\nwrote {results.path}")
    return 0


def print_table(rows: list[dict]) -> None:
    print(f"\n{FRACTION:.0%} of the sites per round; targets at 1,000 sites: <= {TARGET_ROUND_S:g} s per round, "
          f"<= {TARGET_PEAK_GB:g} GB peak, <= {TARGET_RATIO:g}x plain FedAvg\n")
    print("| sites | sites per record | s/round: fedistill | without DP | plain FedAvg | ratio | ratio without DP "
          "| start-up s: fedistill | plain | peak GB: fedistill | without DP | plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ours, no_dp, plain = row["fedistill"], row["fedistill_no_dp"], row["plain_fedavg"]
        print(f"| {row['sites']} | {row['sites_per_record']} | {ours['round_s']:.1f} | {no_dp['round_s']:.1f} "
              f"| {plain['round_s']:.1f} | {row['ratio']:.2f} | {row['ratio_no_dp']:.2f} | {ours['startup_s']:.1f} "
              f"| {plain['startup_s']:.1f} | {ours['peak_gb']:.2f} | {no_dp['peak_gb']:.2f} | {plain['peak_gb']:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
