"""What a privacy budget costs, and whether joining beats not joining, on every task the defaults must serve.

Side by side in one run over seeds, each setting a frontier (`fedistill frontier`: the
federation at several epsilons, the public-only student and the federation without DP),
with the project's defaults: MNIST (5 sites), MNIST with 10 sites, digits with 4 sites and
6 rounds and digits' default, AG News and CLINC150 (150 intents) when `../shared/data` has
them, and with `--lm` the causal-LM task's logits exchange. Prints each frontier and the
targets with their margins; writes bench/results/bench-privacy-cost.json.

    python -m bench.privacy_cost [--seeds 3] [--only NAME] [--lm]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

from bench.run_bench import SHARED_DATA as DATA
from bench.run_bench import ResultsFile, print_targets
from fedistill.frontier import measure, table

SETTINGS = {  # name -> (overrides, epsilons, data file the setting needs or None)
    "mnist": (["task=mnist"], [1.0, 3.0, 8.0], None),
    "mnist-10-sites": (["task=mnist", "sites=10"], [3.0], None),
    "digits": (["task=digits"], [3.0], None),
    "digits-4-sites-6-rounds": (["task=digits", "sites=4", "rounds=6"], [3.0], None),
    "agnews": (["task=text", f"task.data.path={DATA / 'agnews' / 'train.tsv'}"], [1.0, 3.0], DATA / "agnews"),
    "clinc150": (["task=text", f"task.data.path={DATA / 'clinc150' / 'train.csv'}", "task.data.label_column=intent"],
                 [3.0], DATA / "clinc150"),
    "lm-logits": (["task=lm", "exchange=logits"], [8.0], None),
}


def targets(results: dict[str, dict]) -> list[dict]:
    """The issue's targets, each with the figure, the bar and the margin (positive: met)."""
    checks = []

    def at(name: str, eps: float) -> float | None:
        return next((p["mean"] for p in results.get(name, {}).get("points", []) if p["epsilon"] == eps), None)

    if "mnist" in results:
        no_dp, public = results["mnist"]["no_dp"]["mean"], results["mnist"]["public_only"]["mean"]
        checks.append(("MNIST: epsilon 3 keeps >= 92% of the non-private accuracy", at("mnist", 3.0), 0.92 * no_dp))
        checks.append(("MNIST: epsilon 1 beats public-only by >= 5 points", at("mnist", 1.0), public + 0.05))
    if "agnews" in results:
        checks.append(("AG News: epsilon 1 beats public-only", at("agnews", 1.0),
                       results["agnews"]["public_only"]["mean"]))
    for small, default in (("digits-4-sites-6-rounds", "digits"), ("mnist-10-sites", "mnist")):
        if small in results and default in results:
            checks.append((f"{small}: epsilon 3 within 10 points of the default's", at(small, 3.0),
                           at(default, 3.0) - 0.10))
    if "clinc150" in results:
        checks.append(("CLINC150: epsilon 3 keeps >= 80% of the teacher's accuracy", at("clinc150", 3.0),
                       0.8 * results["clinc150"]["teacher"]))
    if "lm-logits" in results:  # perplexity: lower is better
        lm = results["lm-logits"]
        checks.append(("code model: logits exchange below public-only perplexity (shown negated)",
                       -at("lm-logits", 8.0), -lm["public_only"]["mean"]))
    return [{"target": name, "value": value, "bar": bar, "margin": value - bar, "met": value > bar}
            for name, value, bar in checks if value is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], help="run only this setting (repeatable)")
    parser.add_argument("--lm", action="store_true", help="also the causal-LM task (hours on a CPU)")
    parser.add_argument("--out", default="bench-privacy-cost.json", help="file name under bench/results/")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    results = ResultsFile(args.out, seeds=args.seeds)
    measured: dict[str, dict] = {}
    for name, (overrides, epsilons, needs) in SETTINGS.items():
        if (args.only and name not in args.only) or (name == "lm-logits" and not args.lm):
            continue
        if needs is not None and not needs.exists():
            print(f"{name}: skipped, {needs} not found")
            continue
        print(f"\n{name}: {' '.join(overrides)}", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"fedistill-{name}-") as out:
            measured[name] = measure(overrides, epsilons=epsilons, seeds=args.seeds, out=Path(out))
        print(table(measured[name]), flush=True)
        results["frontiers"] = measured
    results["targets"] = targets(measured)
    print_targets(results.result["targets"])


if __name__ == "__main__":
    main()
