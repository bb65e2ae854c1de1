"""The ServerApp: sample sites, average their DP-distilled students, evaluate, write the run directory."""

from __future__ import annotations

import math
import time
from collections import Counter
from logging import INFO

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import payload as P
from common.config import Config, load_config
from common.evaluation import Evaluation, Evaluator
from common.models import count_params, latency_ms, size_bytes
from common.task import build_task
from server import rundir as R
from server.exchange import build_exchange
from server.strategy import FAILED, INVALID, REFUSED, TRAINED, DistillStrategy, RoundOutcome

PROGRESS_TAG = "[fedistill] "  # the `fedistill` command shows log lines with this tag

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = load_config(str(context.run_config["overrides"]))
    run(grid, config)


def run(grid: Grid, config: Config) -> None:
    start = time.perf_counter()
    run_dir = R.RunDirectory(config.run_dir, config)
    task = build_task(config)
    teacher = task.teacher()
    evaluator = Evaluator(task.test_data(), teacher)
    torch.manual_seed(config.seed)
    student = task.student(config.student)
    strategy = DistillStrategy(
        exchange=build_exchange(config, task, teacher, student),
        global_student=student,
        fraction_train=config.federation.fraction_train,
        min_sites=config.federation.min_sites,
    )
    ledger = PrivacyView()
    dropped: Counter[str] = Counter()
    rounds: list[dict] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_start = time.perf_counter()
        P.load_record(student, arrays)
        result = evaluator(student)
        if server_round > 0:
            outcome = strategy.rounds.get(server_round, RoundOutcome())
            ledger.update(server_round, outcome)
            dropped.update(s.site for s in outcome.sites if s.status in (FAILED, INVALID))
            record = round_record(server_round, outcome, result, ledger, start)
            record["eval_s"] = time.perf_counter() - eval_start
            rounds.append(record)
            run_dir.log_round(record)
            run_dir.save_checkpoint(server_round, student)
            log(INFO, progress_line(record, config))
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss, "agreement": result.agreement})

    strategy.start(
        grid,
        initial_arrays=P.model_to_record(student),
        num_rounds=config.rounds,
        timeout=config.federation.round_timeout,
        evaluate_fn=evaluate,
    )
    run_dir.save_model(R.STUDENT_FILE, student)
    run_dir.write_json(R.STUDENT_CONFIG, {"task": config.task.name, "student": vars(config.student),
                                          "num_classes": task.num_classes})
    example = task.test_data().tensors[0]
    summary = {
        "task": config.task.name,
        "exchange": config.exchange.mode,
        "sites": config.sites,
        "rounds_planned": config.rounds,
        "rounds_completed": sum(r["sites_trained"] > 0 for r in rounds),
        "teacher": {**describe(teacher, example), **vars(evaluator.teacher)},
        "student": {**describe(student, example), **vars(evaluator(student))},
        "privacy": ledger.summary(config),
        "communication": {
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "bytes_up_per_site_round": _mean([r["bytes_up"] / r["sites_trained"] for r in rounds if r["sites_trained"]]),
        },
        "dropped_replies": dict(sorted(dropped.items())),
        "seconds": time.perf_counter() - start,
    }
    run_dir.write_json(R.SUMMARY_FILE, summary)
    run_dir.write_json(R.PRIVACY_FILE, summary["privacy"])
    run_dir.write_text(R.PRIVACY_REPORT, privacy_report(summary["privacy"]))
    run_dir.plot(rounds, teacher_accuracy=evaluator.teacher.accuracy, budgets=ledger.budgets)


def describe(model: torch.nn.Module, example: torch.Tensor) -> dict:
    return {"params": count_params(model), "size_bytes": size_bytes(model), "latency_ms": latency_ms(model, example)}


RELEASED = {
    "weights": "each site's DP-trained student weights. They are the output of DP-SGD itself, so they "
               "carry exactly the site's (epsilon, delta); averaging them is post-processing",
    "logits": "each site's DP-trained student's logits on the public inputs, never weights. They are a "
              "function of the DP-SGD output and of public data only, so by the post-processing property "
              "they cost no epsilon beyond the DP training (this holds as long as the public inputs are "
              "not private records of any site). With broadcast=logits a site first fits its student to "
              "the consensus on the public inputs: also post-processing of other sites' DP outputs",
}


class PrivacyView:
    """What the server learns of each site's privacy state from its replies (the site's ledger rules)."""

    def __init__(self) -> None:
        self.epsilon: dict[str, float] = {}
        self.budgets: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.trained: dict[str, int] = {}
        self.refusals: dict[str, list[dict]] = {}

    def update(self, server_round: int, outcome: RoundOutcome) -> None:
        for site in outcome.sites:
            if site.status == FAILED:
                continue
            self.trained.setdefault(site.site, 0)
            self.refusals.setdefault(site.site, [])
            if site.epsilon_spent is not None and not math.isnan(site.epsilon_spent):
                self.epsilon[site.site] = site.epsilon_spent
            if site.epsilon_budget is not None:
                self.budgets[site.site] = site.epsilon_budget
            if site.status == TRAINED:
                self.trained[site.site] += 1
                self.noise[site.site] = site.noise_multiplier or 0.0
            elif site.status == REFUSED:
                self.refusals[site.site].append({"round": server_round, "reason": site.reason})

    def summary(self, config: Config) -> dict:
        dp = config.privacy
        return {
            "enabled": dp.enabled,
            "delta": dp.delta,
            "accountant": dp.accountant,
            "mechanism": (
                "DP-SGD (Opacus): Poisson sampling, per-sample clipping to max_grad_norm "
                f"{dp.max_grad_norm}, Gaussian noise; record-level (epsilon, delta) per site"
                if dp.enabled else "none: privacy.enabled=false, sites trained WITHOUT differential privacy"
            ),
            "released": RELEASED[config.exchange.mode],
            "sites": [
                {
                    "site": site,
                    "epsilon": self.epsilon.get(site),
                    "budget": self.budgets.get(site),
                    "noise_multiplier": self.noise.get(site),
                    "rounds_trained": self.trained[site],
                    "refused_rounds": len(self.refusals[site]),
                    "refusals": self.refusals[site],
                }
                for site in sorted(self.trained, key=_site_order)
            ],
        }


def _site_order(name: str) -> tuple[int, str]:
    tail = name.rsplit("-", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (1 << 30, name)


def round_record(server_round: int, outcome: RoundOutcome, result: Evaluation, ledger: PrivacyView, start: float) -> dict:
    return {
        "round": server_round,
        "accuracy": result.accuracy,
        "loss": result.loss,
        "agreement": result.agreement,
        "sites_sampled": outcome.sampled,
        "sites_trained": outcome.count(TRAINED),
        "sites_refused": outcome.count(REFUSED),
        "sites_failed": outcome.count(FAILED),
        "sites_invalid": outcome.count(INVALID),
        "train_loss": _mean([s.train_loss for s in outcome.sites if s.status == TRAINED]),
        "epsilon": dict(sorted(ledger.epsilon.items(), key=lambda kv: _site_order(kv[0]))),
        "bytes_up": outcome.bytes_up,
        "bytes_down": outcome.bytes_down,
        "round_s": outcome.seconds,
        "server": outcome.server,
        "problems": [{"site": s.site, "status": s.status, "reason": s.reason} for s in outcome.sites if s.status != TRAINED],
        "elapsed_s": time.perf_counter() - start,
    }


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def progress_line(record: dict, config: Config) -> str:
    eps = [e for e in record["epsilon"].values() if e is not None and math.isfinite(e)]
    privacy = f"max eps {max(eps):.2f}/{config.privacy.epsilon:g}" if eps else "no DP"
    refused = f", {record['sites_refused']} refused" if record["sites_refused"] else ""
    failed = record["sites_failed"] + record["sites_invalid"]
    failed = f", {failed} failed" if failed else ""
    return (
        f"{PROGRESS_TAG}round {record['round']}/{config.rounds}: {record['sites_trained']} trained{refused}{failed} | "
        f"accuracy {record['accuracy']:.3f}, agreement {record['agreement']:.3f} | {privacy} | "
        f"{record['elapsed_s']:.0f}s"
    )


def privacy_report(privacy: dict) -> str:
    lines = ["# Privacy report", "", f"Mechanism: {privacy['mechanism']}.", ""]
    lines += [f"Accountant: {privacy['accountant']}; delta = {privacy['delta']:g}.", ""]
    lines += [f"What leaves a site: {privacy['released']}.", ""]
    lines += ["| site | epsilon spent | budget | noise multiplier | rounds trained | rounds refused |",
              "|---|---|---|---|---|---|"]
    for s in privacy["sites"]:
        lines.append(
            f"| {s['site']} | {_fmt(s['epsilon'])} | {_fmt(s['budget'])} | {_fmt(s['noise_multiplier'])} "
            f"| {s['rounds_trained']} | {s['refused_rounds']} |"
        )
    lines += ["", "Epsilon is read from each site's own ledger, which counts every DP step the site has",
              "taken on its data across rounds, runs and restarts."]
    refusals = [(s["site"], r) for s in privacy["sites"] for r in s["refusals"]]
    if refusals:
        lines += ["", "## Refused rounds", ""]
        lines += [f"- round {r['round']}, {site}: {r['reason']}" for site, r in refusals]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"
