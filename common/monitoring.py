"""Prometheus metrics: the names both sides export, a site's activity log and the site's exporter.

A deployed site's ClientApp is a fresh process per message (Flower 1.41), so a site's
metrics cannot live in it: each round appends one line to the site's activity log next to
its privacy ledger, and the long-running `fedistill site` process serves both files to
Prometheus, read afresh on every scrape. The numbers therefore survive restarts and say
exactly what the ledger says.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.privacy import LEDGER_FILE, Budget, LedgerError, PrivacyLedger
from common.storage import private_folder

ACTIVITY_FILE = "activity.jsonl"

SERVER_METRICS = (
    "fedistill_server_round",
    "fedistill_server_rounds_completed_total",
    "fedistill_server_sites_sampled_total",
    "fedistill_server_replies_received_total",
    "fedistill_server_replies_failed_total",
    "fedistill_server_replies_refused_total",
    "fedistill_server_replies_dropped_total",
    "fedistill_server_aggregation_seconds",
    "fedistill_server_round_seconds",
    "fedistill_server_student_metric",
    "fedistill_server_bytes_total",
    "fedistill_server_site_epsilon",
)
SITE_METRICS = (
    "fedistill_site_epsilon_spent",
    "fedistill_site_epsilon_left",
    "fedistill_site_epsilon_budget",
    "fedistill_site_dp_steps_total",
    "fedistill_site_rounds_trained_total",
    "fedistill_site_refusals_total",
    "fedistill_site_ledger_readable",
)


def record_activity(ledger_dir: Path, *, run: str, server_round: int, status: str, code: str | None = None,
                    steps: int = 0) -> None:
    """Append one round's outcome at this site to its activity log (what its metrics count). No
    duration: how long a site works grows with its number of records."""
    private_folder(ledger_dir)
    line = json.dumps({"time": time.time(), "run": run, "round": server_round, "status": status, "code": code,
                       "steps": steps}) + "\n"
    # O_APPEND: whole lines from concurrent processes never interleave
    fd = os.open(ledger_dir / ACTIVITY_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_activity(ledger_dir: Path) -> list[dict]:
    path = ledger_dir / ACTIVITY_FILE
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:  # a line cut by a crash: the ledger, not this log, is the privacy record
            continue
    return lines


class SiteCollector:
    """A prometheus_client collector for one site: its ledger and activity log, read on each scrape."""

    def __init__(self, ledger_dir: Path, *, site: str, budget: Budget):
        self.ledger_dir = ledger_dir
        self.site = site
        self.budget = budget

    def collect(self):
        labels = ["site"]
        spent = GaugeMetricFamily("fedistill_site_epsilon_spent", "Epsilon spent on this site's records, at its delta",
                                  labels=labels)
        left = GaugeMetricFamily("fedistill_site_epsilon_left", "Epsilon left of the site's budget", labels=labels)
        budget = GaugeMetricFamily("fedistill_site_epsilon_budget", "The site's total epsilon budget", labels=labels)
        readable = GaugeMetricFamily("fedistill_site_ledger_readable",
                                     "1 if the privacy ledger reads and checks, 0 if the site refuses every round",
                                     labels=labels)
        steps = CounterMetricFamily("fedistill_site_dp_steps", "DP-SGD steps recorded in the ledger", labels=labels)
        epsilon, dp_steps, ok = self._ledger()
        budget.add_metric([self.site], self.budget.epsilon)
        readable.add_metric([self.site], 1.0 if ok else 0.0)
        if ok:
            spent.add_metric([self.site], epsilon)
            left.add_metric([self.site], max(self.budget.epsilon - epsilon, 0.0))
            steps.add_metric([self.site], dp_steps)
        yield from (spent, left, budget, readable, steps)
        yield from self._activity()

    def _ledger(self) -> tuple[float, int, bool]:
        if not (self.ledger_dir / LEDGER_FILE).exists():
            return 0.0, 0, True
        try:
            ledger = PrivacyLedger.inspect(self.ledger_dir, budget=self.budget)
        except LedgerError:
            return 0.0, 0, False
        return ledger.epsilon_spent(), sum(e.steps for e in ledger.entries if e.dp), True

    def _activity(self):
        lines = read_activity(self.ledger_dir)
        trained = [line for line in lines if line["status"] == "ok"]
        rounds = CounterMetricFamily("fedistill_site_rounds_trained", "Rounds this site trained", labels=["site"])
        rounds.add_metric([self.site], len(trained))
        refusals = CounterMetricFamily("fedistill_site_refusals", "Rounds this site refused, by code",
                                       labels=["site", "code"])
        for code, count in sorted(Counter(line.get("code") or "unknown" for line in lines
                                          if line["status"] != "ok").items()):
            refusals.add_metric([self.site, code], count)
        yield from (rounds, refusals)
