"""What `fedistill` prints while Flower runs and after: the apps' progress lines and the final
table. Light on purpose (no torch): `fedistill simulate` runs Flower from a process that
imports only this, the processes and the simulation SuperLink (fedistill/simulation.py)."""

from __future__ import annotations

import math
import re

from common.progress import PROGRESS_TAG

INTERRUPTED = "fedistill: interrupted; Flower processes stopped"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ProgressOnly:
    """Shows the apps' progress lines and Flower's errors once each; the rest is in flower.log.

    Flower's log stream carries each line twice (console and file format).
    """

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def __call__(self, line: str) -> None:
        line = _ANSI.sub("", line)
        if PROGRESS_TAG in line:
            text = line.split(PROGRESS_TAG, 1)[1]
        elif line.startswith(("ERROR", "Traceback")) or " ERROR " in line:
            text = line.split("ERROR", 1)[-1].lstrip(" :")
        else:
            return
        if text not in self.shown:
            self.shown.add(text)
            print(text, flush=True)


def final_table(summary: dict) -> str:
    models = [summary["teacher"], summary["student"], summary["student_int8"]]
    rows = [("", "teacher", "global student", "int8 student")]
    rows += [(metric["label"], *(f"{m[metric['name']]:.3f}" for m in models)) for metric in summary["metrics"]]
    rows += [
        ("parameters", *(f"{m['params']:,}" for m in models)),
        ("size on disk", *(_kib(m["size_bytes"]) for m in models)),
        ("CPU latency, 1 sample, 1 thread", *(f"{m['latency_ms']:.3f} ms" for m in models)),
    ]
    if "tokens_per_s" in models[0]:
        rows.append(("CPU tokens/s, 1 thread", *(f"{m['tokens_per_s']:,.0f}" for m in models)))
    lines = [f"\n{summary['task']}: {summary['exchange']} exchange, "
             f"{summary['rounds_completed']}/{summary['rounds_planned']} rounds completed"]
    lines += table(rows)
    comm = summary["communication"]
    lines.append(f"communication: {_kib(comm['bytes_up'])} up, {_kib(comm['bytes_down'])} down in all")
    for title, counts in (("replies dropped (failed or invalid)", summary.get("dropped_replies")),
                          ("rounds that left the global student as it was", summary.get("failed_rounds"))):
        if counts:
            lines.append(f"{title}, by reason:")
            lines += [f"  {count} x {reason}" for reason, count in counts.items()]
    privacy = summary["privacy"]
    lines.append(f"\nprivacy ({privacy['accountant']} accountant, delta {privacy['delta']:g})"
                 + ("" if privacy["enabled"] else ": DISABLED, sites trained without DP"))
    site_rows = [("site", "epsilon spent", "budget", "rounds trained", "rounds refused")]
    for s in privacy["sites"]:
        site_rows.append((s["site"], _eps(s["epsilon"]), _eps(s["budget"]), str(s["rounds_trained"]), str(s["refused_rounds"])))
    lines += table(site_rows)
    refusals = [(s["site"], r) for s in privacy["sites"] for r in s["refusals"]]
    if refusals:
        site, first = refusals[0]
        lines.append(f"\n{len(refusals)} site-rounds refused; first: {site} in round {first['round']}: {first['reason']}")
        lines.append("(sites keep the details of a refusal in their own log: in simulation, the run's flower.log)")
    return "\n".join(lines)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _eps(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.3f}"
