"""Does a site's private data, used under DP, make the student better than the coordinator could alone?

Side by side in one run, over several seeds, on the default task: the teacher; a student
distilled on the public inputs alone; the federated DP student with the teacher at several
epsilons and without DP; the same federation on hard labels only; the same with sites
weighted by noisy record counts (charged in their ledgers) and by their true record counts
(a non-private reference); centralized non-private
distillation on all private data (the ceiling). Then DP step time over non-DP step time,
and the wall time of the default `fedistill simulate` split into start-up, training and
evaluation. Prints tables and writes bench/results/bench.json.

    python -m bench.run_bench [--seeds 3] [--skip-simulation] [--only PREFIX] [--epsilons 1 3 8] [overrides ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from bench.baselines import centralized, compose
from fedistill.inprocess import evaluator, federate, public_only, sites_of, task_of
from client.dp_train import distill_locally
from common.step_plan import plan_round
from common.config import load_config

RESULTS = Path(__file__).parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
EPSILONS = ["1", "3", "8"]
# Sites combined in proportion to their record counts, which no site sends under DP: what
# counting sites equally costs, as a reference outside the guarantee.
COUNT_WEIGHTED = "weights, with teacher, weighted by true record counts (reference, not private)"
NOISY_COUNT_WEIGHTED = "weights, with teacher, weighted by noisy record counts"


def settings_for(include_logits: bool, epsilons: list[str]) -> list[tuple[str, str, list[str]]]:
    """(row name, epsilon label, overrides) for every row of the table."""
    levels = [(eps, [f"privacy.epsilon={eps}"]) for eps in epsilons] + [("no DP", ["privacy=none"])]
    settings: list[tuple[str, str, list[str]]] = [("teacher", "-", []), ("public inputs only (no sites)", "-", [])]
    for name, extra in (("weights, with teacher", []), ("weights, hard labels only", ["distill.alpha=0"])):
        settings += [(name, eps, extra + privacy) for eps, privacy in levels]
    settings += [(NOISY_COUNT_WEIGHTED, eps, ["exchange.weighting=noisy_count"] + privacy) for eps, privacy in levels]
    settings += [(COUNT_WEIGHTED, eps, privacy) for eps, privacy in levels]
    if include_logits:
        for broadcast in ("weights", "logits"):
            extra = ["exchange=logits", f"exchange.broadcast={broadcast}"]
            settings += [(f"logits float32, broadcast {broadcast}", eps, extra + privacy) for eps, privacy in levels]
        for compression in ("float16", "topk"):
            extra = ["exchange=logits", f"exchange.compression={compression}"]
            settings += [(f"logits {compression}, broadcast weights", eps, extra + privacy) for eps, privacy in levels]
    settings.append(("centralized, all private data", "no DP", []))
    return settings


def add_work_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, help="keep each setting's federations in WORK/<setting>; the same command "
                                                 "again continues where it stopped (default: a temporary folder)")


@contextlib.contextmanager
def work_folder(work: Path | None, name: str):
    """WORK/<name>, kept; or a temporary folder removed afterwards."""
    if work is not None:
        yield work / name
        return
    with tempfile.TemporaryDirectory(prefix=f"fedistill-{name}-") as folder:
        yield Path(folder)


class ResultsFile:
    """A benchmark's JSON under bench/results/, rewritten whenever something is added: a long run
    stopped part-way loses nothing."""

    def __init__(self, name: str, **fields):
        RESULTS.mkdir(exist_ok=True)
        self.path = RESULTS / name
        self.result: dict = {**fields, "rows": []}

    def __setitem__(self, key: str, value) -> None:
        self.result[key] = value
        self.path.write_text(json.dumps(self.result, indent=2))

    def save_rows(self, rows: list[dict]) -> None:
        self["rows"] = rows


def rows_for(settings: list[tuple[str, str, list[str]]], overrides: list[str], cache: str, args: argparse.Namespace,
             on_row: Callable[[list[dict]], None]) -> list[dict]:
    """Every row of `settings`, each a mean over `args.seeds` seeds; `on_row` sees the rows so far after each one."""
    rows = []
    seeds = args.seeds
    for name, eps, extra in settings:
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        scores, wires = [], []
        for seed in range(seeds):
            config = compose([*overrides, *extra, f"seed={seed}"], cache)
            if name == "teacher":
                scores.append(evaluator(task_of(config)).teacher)
            elif name.startswith("public"):
                scores.append(public_only(config))
            elif name.startswith("centralized"):
                scores.append(centralized(config, args.baseline_epochs))
            else:
                score, wire = federate(config, weight_by_count=name == COUNT_WEIGHTED)
                scores.append(score)
                wires.append(wire["bytes_up_per_site_round"])
        rows.append(_row(name, eps, scores, statistics.mean(wires) if wires else None))
        print(f"  {name:44s} eps {eps:6s} accuracy {rows[-1]['accuracy']:.3f} +- {rows[-1]['accuracy_std']:.3f}", flush=True)
        on_row(rows)
    return rows


def _row(name: str, eps: str, scores: list, bytes_up: float | None) -> dict:
    acc = [s["accuracy"] for s in scores]
    agree = [s["agreement"] for s in scores]
    return {
        "setting": name,
        "epsilon": eps,
        "accuracy": statistics.mean(acc),
        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "agreement": statistics.mean(agree),
        "bytes_up_per_site_round": bytes_up,
        "seeds": len(acc),
    }


def step_time_ratio(overrides: list[str], cache: str, repeats: int = 5) -> dict:
    """Seconds per local DP step over seconds per non-DP step, same site, data and plan."""
    config = compose([*overrides, "seed=0"], cache)
    site = sites_of(config)[0]
    plan = plan_round(config.distill, config.privacy, site.plan_size)
    no_dp = dataclasses.replace(config.privacy, enabled=False)
    timings = {}
    for label, privacy, noise in (("dp", config.privacy, 1.0), ("non_dp", no_dp, None)):
        best = []
        for _ in range(repeats):
            student = site.new_student()
            result = distill_locally(student, site.data, objective=site.objective, distill=config.distill, privacy=privacy,
                                     noise_multiplier=noise, plan=plan, seed=0)
            best.append(result.seconds / result.steps)
        timings[label] = statistics.median(best)
    return {"dp_ms_per_step": 1000 * timings["dp"], "non_dp_ms_per_step": 1000 * timings["non_dp"],
            "ratio": timings["dp"] / timings["non_dp"], "batch_size": plan.expected_batch_size}


def simulation_wall_time(overrides: list[str]) -> dict:
    """Run the real `fedistill simulate` once and split its wall time."""
    run_dir = Path(tempfile.mkdtemp(prefix="fedistill-bench-sim-")) / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedistill.cli", "simulate", *overrides, f"run_dir={run_dir}"],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = sum(r["round_s"] for r in rounds)
    evaluation = sum(r["eval_s"] for r in rounds)
    return {"wall_s": wall, "startup_and_teardown_s": wall - training - evaluation, "training_s": training,
            "evaluation_s": evaluation, "rounds": len(rounds)}


def print_table(rows: list[dict]) -> None:
    """A Markdown table, so it can go into the README as printed."""
    print("\n| setting | epsilon | accuracy | agreement | bytes up per site per round |")
    print("|---|---|---|---|---|")
    for r in rows:
        up = f"{r['bytes_up_per_site_round']:,.0f}" if r["bytes_up_per_site_round"] else "-"
        print(f"| {r['setting']} | {r['epsilon']} | {r['accuracy']:.3f} +- {r['accuracy_std']:.3f} | {r['agreement']:.3f} | {up} |")


def print_targets(targets: list[dict]) -> None:
    """The targets as a Markdown table, each with its margin (positive: met)."""
    print("\n| target | value | bar | margin | met |\n|---|---|---|---|---|")
    for t in targets:
        print(f"| {t['target']} | {t['value']:,.3f} | {t['bar']:,.3f} | {t['margin']:+,.3f} | {'yes' if t['met'] else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--baseline-epochs", type=int, default=30, help="epochs for the centralized student")
    parser.add_argument("--skip-simulation", action="store_true", help="do not time a real Flower simulation")
    parser.add_argument("--weights-only", action="store_true", help="leave out the logits-exchange rows")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="run only the rows whose setting starts with PREFIX (repeatable)")
    parser.add_argument("--epsilons", nargs="+", default=EPSILONS, help="the DP budgets of the DP rows")
    parser.add_argument("--out", default="bench.json", help="file name under bench/results/")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every setting")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    cache = str(load_config(args.overrides).cache_path)
    print(f"Accuracy on the held-out test set, mean over {args.seeds} seeds:")
    results = ResultsFile(args.out, overrides=args.overrides, seeds=args.seeds)
    rows = rows_for(settings_for(not args.weights_only, args.epsilons), args.overrides, cache, args, results.save_rows)
    print_table(rows)
    steps = step_time_ratio(args.overrides, cache)
    results["step_time"] = steps
    print(f"\nLocal step time: DP {steps['dp_ms_per_step']:.1f} ms, non-DP {steps['non_dp_ms_per_step']:.1f} ms, "
          f"ratio x{steps['ratio']:.2f} (batch {steps['batch_size']})")
    if not args.skip_simulation:
        wall = simulation_wall_time(args.overrides)
        results["simulation"] = wall
        print(f"Default simulation ({wall['rounds']} rounds): wall {wall['wall_s']:.0f} s = start-up and teardown "
              f"{wall['startup_and_teardown_s']:.0f} s + training {wall['training_s']:.0f} s + evaluation "
              f"{wall['evaluation_s']:.1f} s")
    print(f"\nwritten to {results.path}")


if __name__ == "__main__":
    main()
