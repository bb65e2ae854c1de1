"""`fedistill frontier`: what a privacy budget costs, and whether joining beats not joining, in one command.

For any task: the federation at several epsilons, the student the coordinator distills alone
from the teacher on the public inputs (public only: where the federation starts), the
federation without DP and the teacher, each over seeds, side by side in one process
(`fedistill.inprocess`: the apps' own round, without Flower's processes). Writes the table
(`frontier.md`), the figures (`frontier.json`) and the task's headline metric against epsilon
with the baselines as lines (`frontier.png`) to its folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

from common.config import Config, ConfigError, load_config
from fedistill.inprocess import evaluator, federate, public_only, task_of

EPSILONS = (1.0, 3.0, 8.0)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "frontier", help="accuracy (or perplexity) against epsilon, beside public-only and no DP",
        description="Run one federation at several epsilons, the public-only student and the federation without "
                    "DP, over seeds, and write frontier.md, frontier.json and frontier.png. Arguments are Hydra "
                    "overrides as for simulate. About 70 s for task=digits with the defaults on a 2-core "
                    "CPU, 4 minutes for the default MNIST, longer for text and far longer for task=lm.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value), e.g. task=digits sites=4")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS), help="the DP budgets (default 1 3 8)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per point (default 3)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for chatty in ("client", "server", "common"):  # a line per site and round: the points are the progress here
        logging.getLogger(chatty).setLevel(logging.WARNING)
    base = load_config(args.overrides)
    out = Path(base.run_dir or Path("outputs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_frontier").resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"run_dir {out} is not empty: choose another run_dir")
    result = measure(args.overrides, epsilons=args.epsilons, seeds=args.seeds, out=out)
    print(table(result))
    print(f"fedistill: the frontier in {out} (frontier.md, frontier.json, frontier.png)")
    return 0


def measure(overrides: list[str], *, epsilons: list[float], seeds: int, out: Path) -> dict:
    """Every point over `seeds`: {metric, teacher, public_only, no_dp, points: [{epsilon, mean, std, ...}]}."""
    if any(not (0 < eps < math.inf) for eps in epsilons):
        raise ConfigError(f"--epsilons must be finite numbers > 0, got {epsilons}")
    out.mkdir(parents=True, exist_ok=True)

    def config(label: str, seed: int, *extra: str) -> Config:
        # each federation its own run folder, so every virtual site starts with a fresh ledger
        return load_config([*overrides, *extra, f"seed={seed}", f"run_dir={out / 'runs' / f'{label}-seed{seed}'}"])

    first = config("public-only", 0)
    metric = evaluator(task_of(first)).metrics[0]
    started = time.perf_counter()

    def point(label: str, scores: list[float]) -> dict:
        mean = statistics.mean(scores)
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"fedistill frontier: {label}: {metric.label} {mean:.3f} +- {std:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        return {"mean": mean, "std": std, "seeds": scores}

    result: dict = {"task": first.task.name, "overrides": overrides, "metric": metric.name, "label": metric.label,
                    "higher_is_better": metric.higher_is_better, "unit_interval": metric.unit_interval,
                    "teacher": statistics.mean(evaluator(task_of(config("teacher", s))).teacher[metric.name]
                                               for s in range(seeds))}
    result["public_only"] = point("public only", [public_only(config("public-only", s))[metric.name]
                                                  for s in range(seeds)])
    result["points"] = []
    for eps in epsilons:
        scores = [federate(config(f"eps{eps:g}", s, f"privacy.epsilon={eps}"))[0][metric.name] for s in range(seeds)]
        result["points"].append({"epsilon": eps, **point(f"epsilon {eps:g}", scores)})
    result["no_dp"] = point("no DP", [federate(config("no-dp", s, "privacy=none"))[0][metric.name]
                                      for s in range(seeds)])
    result["seconds"] = time.perf_counter() - started
    (out / "frontier.json").write_text(json.dumps(result, indent=2))
    (out / "frontier.md").write_text(table(result) + "\n")
    plot(result, out / "frontier.png")
    return result


def table(result: dict) -> str:
    rows = [("teacher", "-", f"{result['teacher']:.3f}"),
            ("public only (no site)", "-", _cell(result["public_only"]))]
    rows += [("federation", f"{p['epsilon']:g}", _cell(p)) for p in result["points"]]
    rows.append(("federation", "no DP", _cell(result["no_dp"])))
    lines = [f"| {result['task']} | epsilon | {result['label']} |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def _cell(point: dict) -> str:
    return f"{point['mean']:.3f} +- {point['std']:.3f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["epsilon"] for p in result["points"]]
    ax.errorbar(xs, [p["mean"] for p in result["points"]], yerr=[p["std"] for p in result["points"]], marker="o",
                capsize=3, label="federation (DP)")
    ax.axhline(result["no_dp"]["mean"], color="tab:green", linestyle=":", label="federation without DP")
    ax.axhline(result["public_only"]["mean"], color="tab:red", linestyle="--", label="public only (no site)")
    ax.axhline(result["teacher"], color="gray", linestyle="-", linewidth=1, label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="epsilon per site (delta from the run)", ylabel=result["label"],
           title=f"{result['task']}: what the privacy budget costs")
    if not result["unit_interval"]:
        ax.set_yscale("log")
    ax.legend(loc="lower right" if result["higher_is_better"] else "upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
