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
from common.request import encode, request_of
from common.tasks import build_task
from server import rundir as R
from server.exchange import build_exchange
from server.metrics import ServerMetrics
from server.report import PrivacyView, mean, privacy_report, progress_line, released_items, round_record
from server.rounds import FAILED, INVALID, ParticipationPlan, RoundEngine, RoundOutcome
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
    plan = ParticipationPlan(rounds=config.rounds, fraction=config.federation.fraction_train,
                             min_sites=config.federation.min_sites, seed=config.seed)
    engine = RoundEngine(
        exchange=build_exchange(config, task, student),
        global_student=student,
        plan=plan,
        allowed_items=set(released_items(config)),
        assets=P.asset_manifest(task),
        request=encode(request_of(config)),
    )
    strategy = DistillStrategy(engine=engine)
    metrics = ServerMetrics(tuple(m.name for m in evaluator.metrics))
    metrics.serve(config.federation.metrics_port, config.federation.metrics_host)
    ledger = PrivacyView()
    dropped: Counter[str] = Counter()
    rounds: list[dict] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_start = time.perf_counter()
        P.load_record(student, arrays)
        scores = evaluator(student)
        if server_round > 0:
            outcome = engine.rounds.get(server_round, RoundOutcome())
            ledger.update(server_round, outcome)
            dropped.update(s.site for s in outcome.sites if s.status in (FAILED, INVALID))
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
        "rounds_completed": sum(r["sites_trained"] > 0 for r in rounds),
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
        "dropped_replies": dict(sorted(dropped.items())),
        "seconds": time.perf_counter() - start,
    }
    run_dir.write_json(R.SUMMARY_FILE, summary)
    run_dir.write_json(R.PRIVACY_FILE, summary["privacy"])
    run_dir.write_text(R.PRIVACY_REPORT, privacy_report(summary["privacy"]))
    run_dir.plot(rounds, metrics=evaluator.metrics, teacher=evaluator.teacher, budgets=ledger.budgets)
    log(INFO, f"{P.PROGRESS_TAG}finished: results, the global student and the privacy report in {run_dir.path}")
