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

EPSILONS = (1.0, 3.0, 8.0)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "frontier", help="accuracy (or perplexity) against epsilon, beside public-only and no DP",
        description="Run one federation at several epsilons, the public-only student and the federation without "
                    "DP, over seeds, and write frontier.md, frontier.json and frontier.png. Arguments are Hydra "
                    "overrides as for simulate. About 70 s for task=digits with the defaults on a 2-core "
                    "CPU, about 2 minutes for the default MNIST, longer for text and far longer for task=lm.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value), e.g. task=digits sites=4")
    parser.add_argument("--epsilons", type=budget_or_override, nargs="+", default=list(EPSILONS),
                        help="the DP budgets (default 1 3 8)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per point (default 3)")
    parser.set_defaults(handler=run)


def budget_or_override(word: str) -> float | str:
    """A word after --epsilons: argparse gives that option every word up to the next option, so
    Hydra overrides written after the budgets (`--epsilons 1 3 seed=4`) arrive here too."""
    if "=" in word:
        return word
    try:
        return float(word)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{word!r} is not an epsilon: give numbers, e.g. --epsilons 1 3 8") from None


def split_budgets(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """The overrides and the epsilons, wherever on the line the overrides were written."""
    epsilons = [word for word in args.epsilons if not isinstance(word, str)]
    if not epsilons:
        raise SystemExit("fedistill frontier: --epsilons needs at least one number, e.g. --epsilons 1 3 8")
    return [*args.overrides, *(word for word in args.epsilons if isinstance(word, str))], epsilons


def output_folder(overrides: list[str], kind: str) -> Path:
    """The folder of an in-process command (frontier, audit): run_dir, or outputs/<time>_<kind>. Its
    sites' per-round log lines are silenced: the command prints its own progress."""
    for chatty in ("client", "server", "common"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    base = load_config(overrides)
    return Path(base.run_dir or Path("outputs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{kind}").resolve()


def run(args: argparse.Namespace) -> int:
    overrides, epsilons = split_budgets(args)
    out = output_folder(overrides, "frontier")
    result = measure(overrides, epsilons=epsilons, seeds=args.seeds, out=out)
    print(table(result))
    print(f"fedistill: the frontier in {out} (frontier.md, frontier.json, frontier.png)")
    return 0


def measure(overrides: list[str], *, epsilons: list[float], seeds: int, out: Path) -> dict:
    """Every point over `seeds`: {metric, teacher, public_only, no_dp, points: [{epsilon, mean, std, ...}]}.

    Each federation's score is appended to `out/scores.jsonl` as soon as it is measured, and a
    frontier started again on the same folder with the same request measures only what is
    missing (the LM rows take hours on a CPU)."""
    from fedistill.inprocess import evaluator, federate, public_only, task_of  # torch: not for `--help`

    if any(not (0 < eps < math.inf) for eps in epsilons):
        raise ConfigError(f"--epsilons must be finite numbers > 0, got {epsilons}")
    out.mkdir(parents=True, exist_ok=True)
    scores = Scores(out, {"overrides": overrides, "epsilons": epsilons, "seeds": seeds})

    def config(label: str, seed: int, *extra: str) -> Config:
        # each federation its own run folder, so every virtual site starts with a fresh ledger; a
        # federation cut short is measured again in a folder of its own, never on the spent ledger
        name = f"{label}-seed{seed}"
        tries = 1
        while (out / "runs" / name).exists():
            tries += 1
            name = f"{label}-seed{seed}-try{tries}"
        folder = out / "runs" / name
        return load_config([*overrides, *extra, f"seed={seed}", f"run_dir={folder}"])

    first = load_config([*overrides, "seed=0"])
    metric = evaluator(task_of(first)).metrics[0]
    started = time.perf_counter()

    def point(label: str, measure_one) -> dict:
        values = [scores.get(label, s, lambda: measure_one(s)[metric.name]) for s in range(seeds)]
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"fedistill frontier: {label}: {metric.label} {mean:.3f} +- {std:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        return {"mean": mean, "std": std, "seeds": values}

    result: dict = {"task": first.task.name, "overrides": overrides, "metric": metric.name, "label": metric.label,
                    "higher_is_better": metric.higher_is_better, "unit_interval": metric.unit_interval,
                    "teacher": statistics.mean(evaluator(task_of(load_config([*overrides, f"seed={s}"])))
                                               .teacher[metric.name] for s in range(seeds))}
    result["public_only"] = point("public only", lambda s: public_only(config("public-only", s)))
    result["points"] = []
    for eps in epsilons:
        measured = point(f"epsilon {eps:g}", lambda s: federate(config(f"eps{eps:g}", s, f"privacy.epsilon={eps}"))[0])
        result["points"].append({"epsilon": eps, **measured})
    result["no_dp"] = point("no DP", lambda s: federate(config("no-dp", s, "privacy=none"))[0])
    result["seconds"] = time.perf_counter() - started + scores.earlier_seconds
    (out / "frontier.json").write_text(json.dumps(result, indent=2))
    (out / "frontier.md").write_text(table(result) + "\n")
    plot(result, out / "frontier.png")
    return result


class Scores:
    """The frontier's progress in `folder/scores.jsonl`: the request on the first line, then one
    line per measured federation, written as soon as it ends. A value is a number or a mapping
    of names to numbers (the attack benchmark keeps two per federation)."""

    def __init__(self, folder: Path, request: dict):
        self.path = folder / "scores.jsonl"
        self.known: dict[tuple[str, int], float | dict[str, float]] = {}
        self.earlier_seconds = 0.0
        if not self.path.exists():
            if any(folder.iterdir()):
                raise ConfigError(f"run_dir {folder} is not empty and holds no frontier: choose another run_dir")
            self.path.write_text(json.dumps({"request": request}) + "\n")
            return
        try:
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            saved = lines[0]["request"]
            for line in lines[1:]:
                self.known[(line["point"], line["seed"])] = _value(line["value"])
                self.earlier_seconds += float(line["seconds"])
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ConfigError(f"{self.path} is not a frontier's progress ({error}): choose another run_dir") from None
        if saved != request:
            raise ConfigError(f"run_dir {folder} holds a frontier of another request ({saved}), not {request}: "
                              "run the same command to continue it, or choose another run_dir")
        print(f"fedistill frontier: continuing in {folder}: {len(self.known)} federations already measured", flush=True)

    def get(self, point: str, seed: int, measure_one):
        if (point, seed) not in self.known:
            started = time.perf_counter()
            value = _value(measure_one())
            with self.path.open("a") as progress:
                progress.write(json.dumps({"point": point, "seed": seed, "value": value,
                                           "seconds": time.perf_counter() - started}) + "\n")
            self.known[(point, seed)] = value
        return self.known[(point, seed)]


def _value(value) -> float | dict[str, float]:
    """A measured value as it is kept: a number, or names to numbers; ValueError otherwise."""
    if isinstance(value, dict):
        return {str(name): float(number) for name, number in value.items()}
    return float(value)


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
