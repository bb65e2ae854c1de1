"""The ServerApp: build the task and the warm-started global student, run the rounds (Flower drives
`server.strategy`, which hands each round to `server.rounds`), evaluate each, write the run directory."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from pathlib import Path
from logging import INFO

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import payload as P
from common.config import RUNS_ENV, Config, ConfigError, load_config
from common.models.inference import describe, quantize_int8
from common.public_distill import initial_student
from common.tasks import build_task
from server import rundir as R
from server.metrics import ServerMetrics
from server.report import PrivacyView, mean, privacy_report, progress_line, round_record
from server.rounds import FAILED, INVALID, RoundEngine, RoundOutcome
from server.strategy import DistillStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = load_config(str(context.run_config["overrides"]))
    run(grid, dataclasses.replace(config, run_dir=str(run_directory(config, context.run_id))))


def run_directory(config: Config, run_id: int) -> Path:
    """Where this run's files go: `run_dir` (absolute), or a new folder under $FEDISTILL_RUNS_DIR
    (`fedistill coordinator` sets it) or ./outputs of the process Flower started the ServerApp in."""
    if config.run_dir is None:
        runs = Path(os.environ.get(RUNS_ENV) or "outputs")
        return (runs / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_run-{run_id}").resolve()
    if not Path(config.run_dir).is_absolute():
        raise ConfigError(
            f"run_dir must be an absolute path when the ServerApp is started by `flwr run`, got "
            f"{config.run_dir!r}: it is read on the coordinator's machine, whose working directory is "
            "Flower's. Pass --run-config \"overrides='run_dir=/abs/path ...'\", or leave it unset"
        )
    return Path(config.run_dir)


def run(grid: Grid, config: Config) -> None:
    start = time.perf_counter()
    run_dir = R.RunDirectory(config.run_dir, config)
    log(INFO, f"{P.PROGRESS_TAG}run directory {run_dir.path}")
    task = build_task(config)
    teacher = task.teacher()
    evaluator = task.evaluator()
    student, report = initial_student(task, config)
    if report is not None:
        log(INFO, f"warm start on the public inputs: {report.epochs} epochs, held-out loss {report.holdout_loss:.3f}")
    engine = RoundEngine.for_run(config, task, student)
    strategy = DistillStrategy(engine=engine, wait_s=config.federation.round_timeout)
    metrics = ServerMetrics(tuple(m.name for m in evaluator.metrics))
    metrics.serve(config.federation.metrics_port, config.federation.metrics_host)
    ledger = PrivacyView()
    dropped: Counter[str] = Counter()  # "status: reason" of every failed or invalid reply
    rounds: list[dict] = []
    last_scores: list[dict] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_start = time.perf_counter()
        outcome = engine.rounds.get(server_round, RoundOutcome())
        if server_round > 0 and outcome.failed and last_scores:
            scores = last_scores[-1]  # a failed round left the global student as it was
        else:
            P.load_record(student, arrays)
            scores = evaluator(student)
        last_scores[:] = [scores]
        if server_round > 0:
            ledger.update(server_round, outcome)
            dropped.update(f"{s.status}: {s.reason}" for s in outcome.sites if s.status in (FAILED, INVALID))
            record = round_record(server_round, outcome, scores, ledger, start)
            record["eval_s"] = time.perf_counter() - eval_start
            rounds.append(record)
            run_dir.log_round(record)
            metrics.observe_round(record)
            run_dir.save_checkpoint(server_round, student)
            log(INFO, progress_line(record, config, evaluator.metrics))
        return MetricRecord(scores)

    strategy.start(
        grid,
        initial_arrays=P.model_to_record(student),
        num_rounds=config.rounds,
        timeout=config.federation.round_timeout,
        evaluate_fn=evaluate,
    )
    task.export(student, run_dir.path)
    int8 = quantize_int8(student)
    run_dir.save_int8(int8)
    example = task.test_data().tensors[0]
    student_cost = describe(student, example, task.tokens_per_example)
    summary = {
        "task": config.task.name,
        "exchange": config.exchange.mode,
        "sites": config.sites,
        "rounds_planned": config.rounds,
        "rounds_completed": sum(not r["round_failed"] for r in rounds),
        "failed_rounds": dict(Counter(r["round_failed"] for r in rounds if r["round_failed"]).most_common()),
        "metrics": [dataclasses.asdict(m) for m in evaluator.metrics],
        "teacher": {**describe(teacher, example, task.tokens_per_example), **evaluator.teacher},
        "student": {**student_cost, **evaluator(student)},
        "student_int8": {**describe(int8, example, task.tokens_per_example), "params": student_cost["params"], **evaluator(int8)},
        "privacy": ledger.summary(config),
        "communication": {
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "bytes_up_per_site_round": mean([r["bytes_up"] / r["sites_trained"] for r in rounds if r["sites_trained"]]),
        },
        "dropped_replies": dict(dropped.most_common()),  # by reason, never site by site
        "seconds": time.perf_counter() - start,
    }
    run_dir.write_json(R.SUMMARY_FILE, summary)
    run_dir.write_json(R.PRIVACY_FILE, summary["privacy"])
    run_dir.write_text(R.PRIVACY_REPORT, privacy_report(summary["privacy"]))
    run_dir.plot(rounds, metrics=evaluator.metrics, teacher=evaluator.teacher, budgets=ledger.budgets)
    log(INFO, f"{P.PROGRESS_TAG}finished: results, the global student and the privacy report in {run_dir.path}")
