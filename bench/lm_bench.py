"""Causal LM on code: does a DP federation distil SmolLM2 into a small, fast code model?

Side by side in one run, over several seeds: the teacher; the student warm-started on the
public corpus alone (what the server has before any site joins); the DP federation with
the teacher at several epsilons and without DP; the same federation on next-token
cross-entropy only (no teacher anywhere, the warm start included); the federation in the
logits exchange; the student pruned from the teacher (student=pruned), warm-started alone
and in the DP federation. Each row: perplexity on the sites' held-out files and on unseen domains,
top-1 agreement with the teacher, bytes per site per round. Then teacher, student, int8
student and pruned student cost (parameters, size on disk, tokens per second on one CPU thread) and the
issue's targets, each with its margin. Prints tables and writes bench/results/bench-lm.json.

    python -m bench.lm_bench [--seeds 3] [--epsilons 3 8] [--only PREFIX] [--pruned student.X=...] [--dp-only]
                              [overrides ...]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings

import torch

from bench.baselines import compose
from fedistill.inprocess import evaluator, federate, start_of, task_of
from bench.run_bench import ResultsFile, print_targets
from common.config import ConfigError, load_config
from common.device import CPU, describe_device, placed
from common.models.inference import describe, quantize_int8
from common.models.lm_teacher import default_teacher_path
from common.models.pruned_lm import non_embedding_params

EPSILONS = ["3", "8"]
TEACHER = "DP federation, with teacher"
CROSS_ENTROPY = "next-token cross-entropy only (no teacher)"
LOGITS = "DP federation, logits exchange"
PUBLIC = "public corpus only (warm-started student)"
PRUNED = "DP federation, pruned student"
PRUNED_PUBLIC = "public corpus only (pruned student)"
SCORES = ("perplexity", "perplexity_unseen", "agreement")


def lm_settings(epsilons: list[str], *, without_dp: bool = True) -> list[tuple[str, str, list[str]]]:
    levels = [(eps, [f"privacy.epsilon={eps}"]) for eps in epsilons] + [("no DP", ["privacy=none"])] * without_dp
    settings: list[tuple[str, str, list[str]]] = [("teacher", "-", []), (PUBLIC, "-", [])]
    for name, extra in ((TEACHER, []), (CROSS_ENTROPY, ["distill.alpha=0"])):
        settings += [(name, eps, extra + privacy) for eps, privacy in levels]
    if "8" in epsilons:
        settings.append((LOGITS, "8", ["exchange=logits", "privacy.epsilon=8"]))
    settings.append((PRUNED_PUBLIC, "-", ["student=pruned"]))
    return settings + [(PRUNED, eps, ["student=pruned", *privacy]) for eps, privacy in levels]


def setting_overrides(overrides: list[str], extra: list[str], pruned: list[str]) -> list[str]:
    """A setting's overrides: the run's, then its own. The pruned student's settings take the
    `--pruned` overrides in place of the run's student.* ones (those describe the from-scratch student)."""
    if "student=pruned" in extra:
        overrides = [o for o in overrides if not o.startswith("student.")] + pruned
    return [*overrides, *extra]


def rows_for(settings: list[tuple[str, str, list[str]]], overrides: list[str], cache: str, args, save) -> list[dict]:
    rows = []
    for name, eps, extra in settings:
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        scores, wires, start = [], [], time.perf_counter()
        for seed in range(args.seeds):
            config = compose([*setting_overrides(overrides, extra, args.pruned), f"seed={seed}"], cache)
            if name == "teacher":
                scores.append(evaluator(task_of(config)).teacher)
            elif name in (PUBLIC, PRUNED_PUBLIC):
                scores.append(evaluator(task_of(config))(start_of(config)[0]))
            else:
                score, wire = federate(config)
                scores.append(score)
                wires.append(wire["bytes_up_per_site_round"])
        rows.append(summarise(name, eps, scores, statistics.mean(wires) if wires else None))
        r = rows[-1]
        print(f"  {name:44s} eps {eps:6s} perplexity {r['perplexity']:.2f} +- {r['perplexity_std']:.2f}, unseen "
              f"{r['perplexity_unseen']:.2f}, agreement {r['agreement']:.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        save(rows)
    return rows


def summarise(name: str, eps: str, scores: list[dict], bytes_up: float | None) -> dict:
    """Mean and standard deviation over seeds of every score (per-part perplexities included)."""
    row = {"setting": name, "epsilon": eps, "seeds": len(scores), "bytes_up_per_site_round": bytes_up}
    for key in scores[0]:
        values = [s[key] for s in scores]
        row[key] = statistics.mean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def costs(overrides: list[str], cache: str, pruned: list[str]) -> dict:
    """Teacher, student, int8 student and pruned student: parameters (also without the token
    embeddings and head), size on disk, tokens per second on one CPU thread; on an accelerator
    (the run's device), also teacher and students there."""
    config = compose([*overrides, "seed=0"], cache)
    task = task_of(config)
    example, tokens = task.test_data().tensors[0], task.tokens_per_example
    student = copy.deepcopy(start_of(config)[0])
    pruned = copy.deepcopy(start_of(compose([*setting_overrides(overrides, ["student=pruned"], pruned), "seed=0"],
                                            cache))[0])
    teacher = task.teacher()  # on the run's device, in the dtype fastest there
    on_cpu = teacher if task.device.type == "cpu" else copy.deepcopy(teacher).to(CPU, torch.float32)
    cost = {"teacher": describe(on_cpu, example, tokens), "student": describe(student, example, tokens),
            "int8 student": describe(quantize_int8(student), example, tokens),
            "pruned student": describe(pruned, example, tokens)}
    for name, model in (("teacher", on_cpu.model), ("student", student.model), ("pruned student", pruned.model)):
        cost[name]["non_embedding_params"] = non_embedding_params(model)
    if task.device.type != "cpu":
        cost[f"teacher on {task.device.type}"] = describe(teacher, example, tokens)
        for name, model in (("student", student), ("pruned student", pruned)):
            with placed(model, task.device):
                cost[f"{name} on {task.device.type}"] = describe(model, example, tokens)
    return cost


def targets(rows: list[dict], cost: dict) -> list[dict]:
    """The issue's targets, each with the figure, the bar and the margin (positive: met)."""
    def row(name: str, eps: str) -> dict | None:
        return next((r for r in rows if r["setting"] == name and r["epsilon"] == eps), None)

    teacher, student = cost["teacher"], cost["student"]
    checks = [("student parameters <= teacher / 20", student["params"], teacher["params"] / 20,
               teacher["params"] / 20 - student["params"])]
    speedup = student["tokens_per_s"] / teacher["tokens_per_s"]
    checks.append(("student >= 10x the teacher's tokens/s, 1 thread", speedup, 10.0, speedup - 10.0))
    for better, worse, what in ((row(TEACHER, "8"), row(PUBLIC, "-"), "epsilon 8 federation below public-only"),
                                (row(TEACHER, "8"), row(CROSS_ENTROPY, "8"), "teacher below cross-entropy only, eps 8"),
                                (row(PRUNED, "3"), row(PRUNED, "8"), "pruned student: epsilon 3 and 8 differ")):
        if better and worse:
            gain = abs(worse["perplexity"] - better["perplexity"])
            spread = max(better["perplexity_std"], worse["perplexity_std"])
            checks.append((f"{what}: sites' held-out perplexity lower by > spread", gain, spread, gain - spread))
    pruned, scratch = row(PRUNED, "3"), row(TEACHER, "3")
    if pruned and scratch:
        checks.append(("pruned student at eps 3: perplexity <= half the from-scratch student's", pruned["perplexity"],
                       scratch["perplexity"] / 2, scratch["perplexity"] / 2 - pruned["perplexity"]))
    quarter = cost["teacher"]["non_embedding_params"] / 4
    checks.append(("pruned student: non-embedding parameters <= teacher's / 4",
                   cost["pruned student"]["non_embedding_params"], quarter,
                   quarter - cost["pruned student"]["non_embedding_params"]))
    pruned, teacher_row = row(PRUNED, "8"), row("teacher", "-")
    if pruned and teacher_row:  # the accelerator target; on a CPU it shows how far the demo's sizes are
        checks.append(("pruned student at eps 8: perplexity within 2x the teacher's", pruned["perplexity"],
                       2 * teacher_row["perplexity"], 2 * teacher_row["perplexity"] - pruned["perplexity"]))
    return [{"target": c[0], "value": c[1], "bar": c[2], "margin": c[3], "met": c[3] > 0} for c in checks]


def print_table(rows: list[dict]) -> None:
    """A Markdown table, so it can go into the README as printed."""
    print("\n| setting | epsilon | held-out perplexity (sites) | perplexity (unseen domains) | agreement | "
          "bytes up per site per round |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        up = f"{r['bytes_up_per_site_round']:,.0f}" if r["bytes_up_per_site_round"] else "-"
        print(f"| {r['setting']} | {r['epsilon']} | {r['perplexity']:.2f} +- {r['perplexity_std']:.2f} | "
              f"{r['perplexity_unseen']:.2f} +- {r['perplexity_unseen_std']:.2f} | {r['agreement']:.3f} | {up} |")


def print_domains(rows: list[dict], sites: list[list[str]]) -> None:
    """Perplexity per site's domain and per unseen domain, a Markdown table."""
    parts = [key.removeprefix("perplexity_") for key in rows[0]
             if key.startswith("perplexity_") and key[11:].startswith(("site-", "unseen-")) and not key.endswith("_std")]

    def label(part: str) -> str:
        if part.startswith("site-") and int(part[5:]) < len(sites):
            return f"{part} ({', '.join(entry.removeprefix('stdlib:') for entry in sites[int(part[5:])])})"
        return part

    print("\n| setting | epsilon | " + " | ".join(label(p) for p in parts) + " |")
    print("|---|---|" + "---|" * len(parts))
    for r in rows:
        print(f"| {r['setting']} | {r['epsilon']} | " + " | ".join(f"{r['perplexity_' + p]:.1f}" for p in parts) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="run only the rows whose setting starts with PREFIX (repeatable)")
    parser.add_argument("--epsilons", nargs="*", default=EPSILONS,
                        help="the DP budgets of the DP rows (none: only the no-DP rows)")
    parser.add_argument("--pruned", nargs="*", default=[], metavar="OVERRIDE",
                        help="student.* overrides of the pruned student's rows, e.g. student.budget=0.25")
    parser.add_argument("--dp-only", action="store_true", help="leave out the rows without DP")
    parser.add_argument("--out", default="bench-lm.json", help="file name under bench/results/")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every setting")
    args = parser.parse_args()
    overrides = ["task=lm", *args.overrides]
    config = load_config(overrides)
    if config.task.teacher.path is None:
        try:
            default_teacher_path()
        except ConfigError as err:
            print(f"skipped: {err}")
            sys.exit(0)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    cache = str(config.cache_path)
    results = ResultsFile(args.out, overrides=overrides, seeds=args.seeds, device=describe_device(config.device))
    cost = costs(overrides, cache, args.pruned)
    results["cost"] = cost
    print("Cost, one record (on one CPU thread unless named): " + ", ".join(
        f"{k} {v['params']:,} parameters, {v['size_bytes'] / 2**20:.1f} MiB, {v['tokens_per_s']:,.0f} tokens/s"
        for k, v in cost.items()))
    print(f"Perplexity and agreement with the teacher, mean over {args.seeds} seeds:")
    rows = rows_for(lm_settings(args.epsilons, without_dp=not args.dp_only), overrides, cache, args, results.save_rows)
    print_table(rows)
    print_domains(rows, config.task.corpus.sites)
    results["targets"] = targets(rows, cost)
    print_targets(results.result["targets"])
    print(f"\nwritten to {results.path}")


if __name__ == "__main__":
    main()
