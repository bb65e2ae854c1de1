"""What a privacy budget costs, and whether joining beats not joining, on every task the defaults must serve.

Side by side in one run over seeds, each setting a frontier (`fedistill frontier`: the
federation at several epsilons, the public-only student and the federation without DP),
with the project's defaults. Each task kind declares its settings and targets (its
`TaskConfig.frontiers` and `frontier_targets`): MNIST (5 sites), MNIST with 10 sites,
digits with 4 sites and 6 rounds and digits' default, AG News and CLINC150 (150 intents)
when `../shared/data` has them, and with `--heavy` the causal-LM task's logits exchange.
Prints each frontier and the targets with their margins; writes
bench/results/bench-privacy-cost.json.

    python -m bench.privacy_cost [--seeds 3] [--only NAME] [--heavy] [--work DIR]

With `--work DIR` every federation's score is kept as it ends and the same command started
again continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import warnings

from bench.run_bench import SHARED_DATA, ResultsFile, add_work_argument, print_targets, work_folder
from common.task_config import FrontierSetting, task_kinds
from fedistill.frontier import measure, table


def settings() -> list[FrontierSetting]:
    """Every task kind's frontier settings, in the order of conf/task/."""
    return [setting for kind in task_kinds().values() for setting in kind.frontiers]


def figure(results: dict[str, dict], place: tuple[str, float | str]) -> float | None:
    """The figure at (setting, epsilon | public_only | no_dp | teacher), None when not measured."""
    name, what = place
    frontier = results.get(name)
    if frontier is None:
        return None
    if what == "teacher":
        return frontier["teacher"]
    if isinstance(what, str):
        return frontier[what]["mean"]
    return next((p["mean"] for p in frontier["points"] if p["epsilon"] == what), None)


def targets(results: dict[str, dict]) -> list[dict]:
    """Every task kind's targets that this run measured, each with the figure, the bar and the
    margin (positive: met)."""
    checks = []
    for target in (t for kind in task_kinds().values() for t in kind.frontier_targets):
        value, reference = figure(results, target.value), figure(results, target.bar)
        if value is None or reference is None:
            continue
        bar = target.share * reference + target.offset
        margin = bar - value if target.lower_is_better else value - bar
        checks.append({"target": target.label + (" (lower is better)" if target.lower_is_better else ""),
                       "value": value, "bar": bar, "margin": margin, "met": margin > 0})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], help="run only this setting (repeatable)")
    parser.add_argument("--heavy", action="store_true", help="also the settings that take hours on a CPU (the causal-LM task)")
    parser.add_argument("--out", default="bench-privacy-cost.json", help="file name under bench/results/")
    add_work_argument(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    results = ResultsFile(args.out, seeds=args.seeds)
    measured: dict[str, dict] = {}
    for setting in settings():
        name = setting.name
        if (args.only and name not in args.only) or (setting.heavy and not args.heavy):
            continue
        if setting.needs is not None and not (SHARED_DATA / setting.needs).exists():
            print(f"{name}: skipped, {SHARED_DATA / setting.needs} not found")
            continue
        overrides = [o.replace("{data}", str(SHARED_DATA)) for o in setting.overrides]
        print(f"\n{name}: {' '.join(overrides)}", flush=True)
        with work_folder(args.work, name) as out:
            measured[name] = measure(overrides, epsilons=list(setting.epsilons), seeds=args.seeds, out=out)
        print(table(measured[name]), flush=True)
        results["frontiers"] = measured
    results["targets"] = targets(measured)
    print_targets(results.result["targets"])


if __name__ == "__main__":
    main()
