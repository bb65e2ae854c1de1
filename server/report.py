"""What a run reports: per-round records, the progress line, per-site privacy, the privacy report."""

from __future__ import annotations

import math
import time

import torch

from common import payload as P
from common.config import Config
from common.evaluation import Evaluation
from common.models import count_params, latency_ms, size_bytes
from server.strategy import FAILED, INVALID, REFUSED, TRAINED, RoundOutcome

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
            "released": RELEASED[config.exchange.mode] if dp.enabled else (
                f"each site's student {'weights' if config.exchange.mode == 'weights' else 'logits on the public inputs'}, "
                "trained WITHOUT differential privacy: they carry no privacy guarantee"),
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
        "train_loss": mean([s.train_loss for s in outcome.sites if s.status == TRAINED]),
        "epsilon": dict(sorted(ledger.epsilon.items(), key=lambda kv: _site_order(kv[0]))),
        "bytes_up": outcome.bytes_up,
        "bytes_down": outcome.bytes_down,
        "round_s": outcome.seconds,
        "server": outcome.server,
        "problems": [{"site": s.site, "status": s.status, "reason": s.reason} for s in outcome.sites if s.status != TRAINED],
        "elapsed_s": time.perf_counter() - start,
    }


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def progress_line(record: dict, config: Config) -> str:
    eps = [e for e in record["epsilon"].values() if e is not None and math.isfinite(e)]
    privacy = f"max eps {max(eps):.2f}/{config.privacy.epsilon:g}" if eps else "no DP"
    refused = f", {record['sites_refused']} refused" if record["sites_refused"] else ""
    failed = record["sites_failed"] + record["sites_invalid"]
    failed = f", {failed} failed" if failed else ""
    return (
        f"{P.PROGRESS_TAG}round {record['round']}/{config.rounds}: {record['sites_trained']} trained{refused}{failed} | "
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
              "taken on its data across rounds, runs and restarts.", "",
              "Besides the DP-protected payload, a site reports its number of records (to weight the",
              "mean), its epsilon and budget, and its training time. The record count is treated as",
              "public, as in DP-FedAvg practice; if a site's count is itself sensitive, that site",
              "should not join. Under DP a site does not report its training loss, a statistic of",
              "its private records outside the DP mechanism."]
    refusals = [(s["site"], r) for s in privacy["sites"] for r in s["refusals"]]
    if refusals:
        lines += ["", "## Refused rounds", ""]
        lines += [f"- round {r['round']}, {site}: {r['reason']}" for site, r in refusals]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"
