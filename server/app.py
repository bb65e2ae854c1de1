"""The ServerApp: build the task and the warm-started global student, run the rounds (Flower drives
`server.strategy`, which hands each round to `server.rounds`), evaluate each, write the run directory."""

from __future__ import annotations

# Before anything else: see common/preload.py for the two-thread import race this prevents.
import common.preload  # noqa: F401, I001

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
from common.config import METRICS_ENV, RUNS_ENV, Config, ConfigError, load_config
from common.models.inference import describe, quantize_int8
from common.public_distill import initial_student
from common.tasks import build_task
from server import rundir as R
from server.metrics import ServerMetrics
from server.report import aggregation_summary, mean, privacy_report, progress_line, round_record
from server import resume
from server.resume import Progress, SavedRun
from server.rounds import FAILED, INVALID, RoundEngine, RoundOutcome
from server.strategy import DistillStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = load_config(str(context.run_config["overrides"]))
    overrides, saved = config.overrides, None
    if config.resume is not None:
        if not Path(config.resume).is_absolute():
            raise ConfigError(f"resume must be an absolute path when the ServerApp is started by `flwr run`, got "
                              f"{config.resume!r}: it is the run directory on the coordinator's machine")
        saved = SavedRun.read(config.resume)
        overrides = saved.overrides_for(overrides)
        config = load_config(overrides)
        saved.check_rounds_left(config.rounds)
    run(grid, dataclasses.replace(config, run_dir=str(run_directory(config, context.run_id))),
        overrides=overrides, run_id=context.run_id, saved=saved)


def metrics_address(config: Config) -> tuple[int | None, str]:
    """(port, host) of the run's metrics: the run's federation.metrics_port, else the coordinator's."""
    if config.federation.metrics_port is not None or not os.environ.get(METRICS_ENV):
        return config.federation.metrics_port, config.federation.metrics_host
    host, _, port = os.environ[METRICS_ENV].rpartition(":")
    return int(port), host


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


def run(grid: Grid, config: Config, *, overrides: list[str], run_id: int, saved: SavedRun | None = None) -> None:
    """The run `config` describes, or, with `saved`, the rest of it from its last saved round."""
    start = time.perf_counter()
    run_dir = R.RunDirectory(config.run_dir, config)
    log(INFO, f"{P.PROGRESS_TAG}run directory {run_dir.path}")
    task = build_task(config)
    teacher = task.teacher()
    evaluator = task.evaluator()
    if saved is None:
        student, report = initial_student(task, config)
        if report is not None:
            log(INFO, f"warm start on the public inputs: {report.epochs} epochs, held-out loss {report.holdout_loss:.3f}"
                      f"{' (cached by an earlier run)' if report.cached else ''}")
        engine, progress, done = RoundEngine.for_run(config, task, student), Progress(), 0
    else:
        student = task.student(config.student)
        engine, progress, done = RoundEngine.for_run(config, task, student), saved.progress(), saved.round
        saved.restore(engine)
        progress.privacy.begin_part()
        run_dir.rewrite_rounds(progress.rounds)  # a round logged after the saved one is run again
        log(INFO, f"{P.PROGRESS_TAG}resuming after round {done} of {config.rounds}")
    progress.runs.append(run_id)
    if saved is not None:  # this part is on record even if it dies before its first round
        resume.save(run_dir.path, done, overrides=overrides, engine=engine, progress=progress)
    strategy = DistillStrategy(engine=engine, wait_s=config.federation.round_timeout, rounds_done=done)
    metrics = ServerMetrics(tuple(m.name for m in evaluator.metrics))
    metrics.serve(*metrics_address(config))

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_start = time.perf_counter()
        server_round = flower_round + done
        outcome = engine.rounds.get(server_round, RoundOutcome())
        if flower_round > 0 and outcome.failed and progress.scores is not None:
            scores = progress.scores  # a failed round left the global student as it was
        else:
            P.load_record(student, arrays)
            scores = evaluator(student)
        progress.scores = scores
        if flower_round == 0 and done:
            return MetricRecord(scores)  # the saved round's student, already recorded
        if server_round > 0:
            progress.privacy.update(server_round, outcome)
            progress.dropped.update(f"{s.status}: {s.reason}" for s in outcome.sites if s.status in (FAILED, INVALID))
            record = round_record(server_round, outcome, scores, progress.privacy, start)
            record["eval_s"] = time.perf_counter() - eval_start
            progress.rounds.append(record)
            run_dir.log_round(record)
            metrics.observe_round(record)
            log(INFO, progress_line(record, config, evaluator.metrics))
        if outcome.ran:
            run_dir.save_checkpoint(server_round, student)
            resume.save(run_dir.path, server_round, overrides=overrides, engine=engine, progress=progress)
        return MetricRecord(scores)

    strategy.start(
        grid,
        initial_arrays=P.model_to_record(student),
        num_rounds=config.rounds - done,
        timeout=config.federation.round_timeout,
        evaluate_fn=evaluate,
    )
    rounds, ledger, dropped = progress.rounds, progress.privacy, progress.dropped
    task.export(student, run_dir.path)
    int8 = quantize_int8(student)
    run_dir.save_int8(int8)
    example = task.test_data().tensors[0]
    student_cost = describe(student, example, task.tokens_per_example)
    summary = {
        "task": config.task.name,
        "exchange": config.exchange.mode,
        "sites": len(engine.nodes_seen),  # connected at some round (a deployment's, not `sites=`)
        "rounds_planned": config.rounds,
        "flower_runs": progress.runs,  # more than one: the run was resumed
        "rounds_completed": sum(not r["round_failed"] for r in rounds),
        "failed_rounds": dict(Counter(r["round_failed"] for r in rounds if r["round_failed"]).most_common()),
        "metrics": [dataclasses.asdict(m) for m in evaluator.metrics],
        "teacher": {**describe(teacher, example, task.tokens_per_example), **evaluator.teacher},
        "student": {**student_cost, **evaluator(student)},
        "student_int8": {**describe(int8, example, task.tokens_per_example), "params": student_cost["params"], **evaluator(int8)},
        "privacy": ledger.summary(config),
        "aggregation": aggregation_summary(config, rounds),
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
