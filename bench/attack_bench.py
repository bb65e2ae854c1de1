"""Hostile sites against the aggregators: accuracy of the global student with 0, 10 and 30 percent
of the sites hostile, for each attack and each aggregator, side by side in one run over seeds, in
both exchanges (MNIST, ten sites, the project's defaults otherwise).

Three settings: the weights exchange as it runs by default (the server distills the combined
student toward the teacher each round, which repairs much of an attack by itself), the weights
exchange without that step (what aggregation alone stops), and the logits exchange. Backdoor
rows also give the attack's success: the share of held-out inputs of other classes that the
trigger takes to its target class (client/hostile.py). Checks the targets: at 30 percent the
best aggregator within 3 points of the clean run (for the backdoor, the best of those that stop
it: trigger success at most 10%), and with no hostile site each robust
aggregator at most 2 points below the mean. Prints the tables, writes
bench/results/bench-attack.json.

    python -m bench.attack_bench [--seeds 3] [--only SETTING] [--work DIR]

With `--work DIR` every federation's scores are kept as it ends and the same command started
again continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from bench.run_bench import ResultsFile, add_work_argument, print_targets, work_folder

FRACTIONS = (0.1, 0.3)
BASE = ["task=mnist", "sites=10"]
WEIGHTS_AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "mean+clip")
# Krum and Multi-Krum assume exchange.assumed_hostile's default share (f = 2 of 10); Bulyan needs
# 4f + 3 replies, so with ten sites it can assume at most one hostile site.
BULYAN_ASSUMED_HOSTILE = 0.1
LOGITS_AGGREGATORS = ("mean", "median", "trimmed_mean")
CLIP_NORM = 10.0  # "mean+clip": updates clipped on the server to this L2 norm (honest DP updates: about 6 on MNIST)
WITHIN_CLEAN = 0.03  # at 30 percent hostile, the best aggregator within 3 points of the clean run
ROBUST_COST = 0.02   # with no hostile site, each robust aggregator at most 2 points below the mean
BACKDOOR_STOPPED = 0.1  # a backdoor counts as stopped where the trigger takes at most 10% of inputs to its target


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    overrides: tuple[str, ...]
    aggregators: tuple[str, ...]
    attacks: tuple[str, ...]


SETTINGS = (
    Setting("weights", "weights exchange (defaults: the server distills toward the teacher each round)", (),
            WEIGHTS_AGGREGATORS, ("scale", "sign_flip", "random", "constant", "backdoor")),
    Setting("weights-plain", "weights exchange without the server's distillation (aggregation alone)",
            ("exchange.server.distill_teacher=false",), WEIGHTS_AGGREGATORS,
            ("scale", "sign_flip", "random", "constant", "backdoor")),
    Setting("logits", "logits exchange", ("exchange=logits",), LOGITS_AGGREGATORS, ("inverted", "uniform")),
)


def aggregator_overrides(aggregator: str) -> list[str]:
    if aggregator == "mean+clip":
        return ["exchange.aggregation=mean", f"exchange.clip_update_norm={CLIP_NORM}"]
    if aggregator == "bulyan":
        return ["exchange.aggregation=bulyan", f"exchange.assumed_hostile={BULYAN_ASSUMED_HOSTILE}"]
    return [f"exchange.aggregation={aggregator}"]


def scenarios(setting: Setting) -> list[tuple[str, float]]:
    """(attack, fraction) rows: the clean run first."""
    return [("none", 0.0)] + [(attack, fraction) for attack in setting.attacks for fraction in FRACTIONS]


def measure(setting: Setting, *, seeds: int, out: Path) -> dict:
    """Every (attack, fraction, aggregator) cell over `seeds`: {accuracy: {mean, std, seeds}, backdoor: ...}."""
    from client.hostile import backdoor_rate  # torch: not for --help
    from common.config import load_config
    from fedistill.frontier import Scores
    from fedistill.inprocess import federate

    out.mkdir(parents=True, exist_ok=True)
    progress = Scores(out, {"setting": setting.name, "base": BASE})  # more seeds later continue the same folder
    started, cells = time.perf_counter(), {}
    for attack, fraction in scenarios(setting):
        for aggregator in setting.aggregators:
            label = f"{attack}-{fraction:g}-{aggregator}"
            hostile = [] if attack == "none" else [f"federation.hostile.kind={attack}", f"federation.hostile.fraction={fraction}"]

            def one(seed: int) -> dict:
                config = load_config([*BASE, *setting.overrides, *hostile, *aggregator_overrides(aggregator),
                                      f"seed={seed}", f"run_dir={out / 'runs' / f'{label}-seed{seed}-{time.time_ns()}'}"])
                scores = federate(config, also=backdoor_rate)[0]
                return {"accuracy": scores["accuracy"], "backdoor": scores["backdoor"]}

            values = [progress.get(label, seed, lambda seed=seed: one(seed)) for seed in range(seeds)]
            cells[label] = {key: summary([v[key] for v in values]) for key in ("accuracy", "backdoor")}
            print(f"{setting.name}: {attack} {fraction:.0%} hostile, {aggregator}: accuracy "
                  f"{cells[label]['accuracy']['mean']:.3f} +- {cells[label]['accuracy']['std']:.3f}, backdoor "
                  f"{cells[label]['backdoor']['mean']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"label": setting.label, "aggregators": list(setting.aggregators), "cells": cells}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": values}


def table(setting: Setting, result: dict) -> str:
    """Accuracy per attack (rows) and aggregator (columns); backdoor rows add the trigger's success."""
    cells = result["cells"]
    lines = [f"{result['label']}:", "",
             "| hostile sites | " + " | ".join(setting.aggregators) + " |",
             "|---|" + "---|" * len(setting.aggregators)]
    for attack, fraction in scenarios(setting):
        row = []
        for aggregator in setting.aggregators:
            cell = cells[f"{attack}-{fraction:g}-{aggregator}"]
            text = f"{cell['accuracy']['mean']:.3f}" + (f" +- {cell['accuracy']['std']:.3f}" if len(cell['accuracy']['seeds']) > 1 else "")
            if attack == "backdoor" or attack == "none":
                text += f" ({cell['backdoor']['mean']:.2f})"
            row.append(text)
        name = "none" if attack == "none" else f"{fraction:.0%} {attack}"
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets(setting: Setting, result: dict) -> list[dict]:
    """The issue's two goals for one setting, each with its figure, bar and margin (positive: met)."""
    cells, checks = result["cells"], []
    clean = cells["none-0-mean"]["accuracy"]["mean"]
    for attack in setting.attacks:
        # a backdoor is stopped only where the trigger does not work: the best of those aggregators
        stopping = [a for a in setting.aggregators if attack != "backdoor"
                    or cells[f"{attack}-0.3-{a}"]["backdoor"]["mean"] <= BACKDOOR_STOPPED]
        best, aggregator = max(((cells[f"{attack}-0.3-{a}"]["accuracy"]["mean"], a) for a in stopping),
                               default=(0.0, "none stops it"))
        bar = clean - WITHIN_CLEAN
        checks.append({"target": f"{setting.name}: 30% {attack}, best aggregator ({aggregator}) within 3 points of clean",
                       "value": best, "bar": bar, "margin": best - bar, "met": best >= bar})
    for aggregator in setting.aggregators[1:]:
        value, bar = cells[f"none-0-{aggregator}"]["accuracy"]["mean"], clean - ROBUST_COST
        checks.append({"target": f"{setting.name}: no hostile site, {aggregator} at most 2 points below the mean",
                       "value": value, "bar": bar, "margin": value - bar, "met": value >= bar})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], choices=[s.name for s in SETTINGS],
                        help="run only this setting (repeatable)")
    parser.add_argument("--out", default="bench-attack.json", help="file name under bench/results/")
    add_work_argument(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    for chatty in ("client", "server", "common"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    results = ResultsFile(args.out, seeds=args.seeds, base=BASE, clip_norm=CLIP_NORM)
    measured, checks = {}, []
    for setting in SETTINGS:
        if args.only and setting.name not in args.only:
            continue
        with work_folder(args.work, setting.name) as out:
            measured[setting.name] = measure(setting, seeds=args.seeds, out=out)
        print("\n" + table(setting, measured[setting.name]) + "\n", flush=True)
        checks += targets(setting, measured[setting.name])
        results["settings"] = measured
        results["targets"] = checks
    print_targets(checks)


if __name__ == "__main__":
    main()
