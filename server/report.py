"""What a run reports: per-round records, the progress line, per-site privacy, the privacy report."""

from __future__ import annotations

import math
import time


from common import payload as P
from common.config import Config
from common.evaluation import Metric, Scores
from server.rounds import FAILED, INVALID, REFUSED, TRAINED, RoundOutcome

GUARANTEE = (
    "Each site's records are protected by record-level (epsilon, delta) differential privacy under the "
    "add/remove-one-record neighbouring relation: DP-SGD with Poisson sampling at a public sample rate, "
    "per-sample gradient clipping and Gaussian noise, accounted with Opacus's RDP accountant at the site, "
    "in the site's own ledger, across every run that used those records. Everything a site sends is a "
    "function of that DP output, of public inputs and of public settings (the items below); no record count, "
    "training loss or timing leaves a site under DP. Sites count equally when the server combines them, "
    "unless each releases a noisy record count, charged in its ledger (exchange.weighting=noisy_count)"
)
TRUST = (
    "A site must still trust the code it runs: the coordinator ships the app (this project's client code) to "
    "every site, and that code is what enforces the site's policy and writes its ledger; a deployed site pins "
    "the app it vetted (app_sha256) and runs no other. DP randomness comes from the operating system's entropy, not a "
    "cryptographically secure generator (Opacus's secure_mode needs torchcsprng, which has no wheels for "
    "current torch)"
)


def released_items(config: Config) -> dict[str, str]:
    """What may leave a site in this run, with why: common.payload's lists for this exchange."""
    return P.released_items(mode=config.exchange.mode, weighting=config.exchange.weighting, dp=config.privacy.enabled)


class PrivacyView:
    """What the server learns of each site's privacy state from its replies (the site's ledger rules).

    A site reports the spend of the Flower run it answers; a resumed run is a new Flower run,
    so the spend each site reported before a resume is kept as an earlier part.
    """

    def __init__(self) -> None:
        self.epsilon: dict[str, float] = {}
        self.earlier_parts: dict[str, list[float | None]] = {}
        self.budgets: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.sample_rate: dict[str, float] = {}
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
                self.noise[site.site] = site.noise_multiplier
                self.sample_rate[site.site] = site.sample_rate
            elif site.status == REFUSED:
                self.refusals[site.site].append({"round": server_round, "code": site.code, "reason": site.reason})

    def begin_part(self) -> None:
        """A resumed run's first round is next: what each site reported so far is an earlier part."""
        for site in self.trained:
            self.earlier_parts.setdefault(site, []).append(self.epsilon.pop(site, None))

    def summary(self, config: Config) -> dict:
        dp = config.privacy
        return {
            "enabled": dp.enabled,
            "delta": dp.delta,
            "accountant": dp.accountant,
            "neighbouring_relation": "add/remove one record",
            "mechanism": (
                "DP-SGD (Opacus): Poisson sampling at sample rate "
                f"{_sample_rate(config)}, per-sample clipping to max_grad_norm {dp.max_grad_norm}, "
                "Gaussian noise calibrated by each site; record-level (epsilon, delta) per site"
                if dp.enabled else "none: privacy.enabled=false, sites trained WITHOUT differential privacy"
            ),
            "guarantee": GUARANTEE if dp.enabled else "none: the sites' records have no DP guarantee from this run "
                         "on; each site's ledger records the release as unbounded and refuses DP claims afterwards",
            "released": released_items(config),
            "trust": TRUST,
            "sites_per_record": config.task.sites_per_record,
            "sites": [
                {
                    "site": site,
                    "epsilon": self.epsilon.get(site),
                    "epsilon_earlier_parts": self.earlier_parts.get(site, []),
                    "budget": self.budgets.get(site),
                    "noise_multiplier": self.noise.get(site),
                    "sample_rate": self.sample_rate.get(site),
                    "rounds_trained": self.trained[site],
                    "refused_rounds": len(self.refusals[site]),
                    "refusals": self.refusals[site],
                }
                for site in sorted(self.trained, key=_site_order)
            ],
        }


def _sample_rate(config: Config) -> str:
    if config.distill.sample_rate is not None:
        return f"{config.distill.sample_rate:g}"
    return ("each site's own, chosen with its local epochs and normaliser by the DP-aware rule "
            "(common/step_plan.py) from the run's budget and the size class the site declares")


def _site_order(name: str) -> tuple[int, str]:
    tail = name.rsplit("-", 1)[-1]
    return (int(tail), name) if tail.isdigit() else (1 << 30, name)


def round_record(server_round: int, outcome: RoundOutcome, scores: Scores, ledger: PrivacyView, start: float) -> dict:
    return {
        "round": server_round,
        **scores,
        "sites_sampled": outcome.sampled,
        "sites_trained": outcome.count(TRAINED),
        "trained": sorted((s.site for s in outcome.sites if s.status == TRAINED), key=_site_order),
        "sites_refused": outcome.count(REFUSED),
        "sites_failed": outcome.count(FAILED),
        "sites_invalid": outcome.count(INVALID),
        "round_failed": outcome.failed or None,  # why the global student was left as it was
        "train_loss": mean([s.train_loss for s in outcome.sites if s.status == TRAINED]),
        "epsilon": dict(sorted(ledger.epsilon.items(), key=lambda kv: _site_order(kv[0]))),
        "bytes_up": outcome.bytes_up,
        "bytes_down": outcome.bytes_down,
        "round_s": outcome.seconds,
        "aggregation_s": outcome.aggregation_seconds,
        "server": outcome.server,
        "problems": [{"site": s.site, "status": s.status, "code": s.code, "reason": s.reason}
                     for s in outcome.sites if s.status != TRAINED],
        "reply_items": sorted(outcome.reply_items),
        "elapsed_s": time.perf_counter() - start,
    }


def aggregation_summary(config: Config, rounds: list[dict]) -> dict:
    """How the replies were combined (summary.json's "aggregation"), with what clipping and selection did."""
    exchange, servers = config.exchange, [r["server"] for r in rounds]
    summary: dict = {"method": exchange.aggregation}
    if exchange.aggregation == "trimmed_mean":
        summary["trim_fraction"] = exchange.trim_fraction
    if any("selected" in s for s in servers):
        summary |= {"assumed_hostile": exchange.assumed_hostile,
                    "replies_selected": sum(s.get("selected", 0) for s in servers)}
    if exchange.clip_update_norm is not None:
        summary |= {"clip_update_norm": exchange.clip_update_norm,
                    "replies_clipped": sum(s.get("clipped", 0) for s in servers)}
    hostile = config.federation.hostile
    if hostile.kind != "none":  # a simulation's attack trial
        summary["hostile"] = {"kind": hostile.kind, "fraction": hostile.fraction,
                              "sites": sum(hostile.is_hostile(i, config.sites) for i in range(config.sites))}
    return summary


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def progress_line(record: dict, config: Config, metrics: tuple[Metric, ...]) -> str:
    eps = [e for e in record["epsilon"].values() if e is not None and math.isfinite(e)]
    privacy = f"max eps {max(eps):.2f}/{config.privacy.epsilon:g}" if eps else "no DP"
    refused = f", {record['sites_refused']} refused ({named(record, REFUSED)})" if record["sites_refused"] else ""
    failed = record["sites_failed"] + record["sites_invalid"]
    failed = f", {failed} failed" if failed else ""
    unchanged = f" | round failed, global student unchanged: {record['round_failed']}" if record["round_failed"] else ""
    return (
        f"{P.PROGRESS_TAG}round {record['round']}/{config.rounds}: {record['sites_trained']} trained{refused}{failed} | "
        f"{', '.join(f'{m.name} {record[m.name]:.3f}' for m in metrics[:2])} | {privacy} | "
        f"{record['elapsed_s']:.0f}s{unchanged}"
    )


def named(record: dict, status: str, shown: int = 3) -> str:
    """'site-a: app, site-c: budget': the sites of a round record's problems with `status`, and their codes."""
    sites = [f"{p['site']}: {p['code']}" if p["code"] else p["site"] for p in record["problems"] if p["status"] == status]
    more = f" and {len(sites) - shown} more" if len(sites) > shown else ""
    return ", ".join(sites[:shown]) + more


def privacy_report(privacy: dict) -> str:
    lines = ["# Privacy report", "", f"Guarantee: {privacy['guarantee']}.", "",
             f"Mechanism: {privacy['mechanism']}.", "",
             f"Accountant: {privacy['accountant']}; delta = {privacy['delta']:g}; neighbouring relation: "
             f"{privacy['neighbouring_relation']}.", "",
             "## What leaves a site, and why it may", ""]
    lines += [f"- `{item}`: {why}." for item, why in privacy["released"].items()]
    lines += ["", "Nothing else leaves a site: the server drops a reply holding any other item.", "",
              "## Per site", "",
              "| site | epsilon spent | budget | noise multiplier | rounds trained | rounds refused |",
              "|---|---|---|---|---|---|"]
    for s in privacy["sites"]:
        lines.append(
            f"| {s['site']} | {_fmt(s['epsilon'])} | {_fmt(s['budget'])} | {_fmt(s['noise_multiplier'])} "
            f"| {s['rounds_trained']} | {s['refused_rounds']} |"
        )
    if any(s["epsilon_earlier_parts"] for s in privacy["sites"]):
        lines += ["", "This run was resumed: the table shows the spend of its last part, each site's spend in the",
                  "parts before in `privacy.json` (`epsilon_earlier_parts`, as last reported: a round a site trained",
                  "for a coordinator that died is charged in its ledger, not here). The run's guarantee is the",
                  "composition of its parts, which each site's ledger computes over all its releases."]
    holders = privacy.get("sites_per_record", 1)
    if holders > 1:
        spent = [s["epsilon"] for s in privacy["sites"] if s["epsilon"] is not None]
        bound = f" ({holders} x {max(spent):.3g} = {holders * max(spent):.3g})" if spent else ""
        lines += ["", f"Each record of the simulated partition is held by {holders} sites (task.sites_per_record), each",
                  "with its own ledger: a site's epsilon covers its own releases, and across the federation a",
                  f"record's releases compose over the sites that hold it, up to {holders} times the largest epsilon",
                  f"above{bound}."]
    lines += ["", "Epsilon is read from each site's own ledger, which counts every release the site has made",
              "from its records across rounds, runs and restarts.", "", f"What a site must still trust: {privacy['trust']}."]
    refusals = [(s["site"], r) for s in privacy["sites"] for r in s["refusals"]]
    if refusals:
        lines += ["", "## Refused rounds", ""]
        lines += [f"- round {r['round']}, {site} ({r['code']}): {r['reason']}" for site, r in refusals]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"
