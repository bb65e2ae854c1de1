"""The lines of `fedistill site-check`'s report: what was checked, ok / warn / FAIL, what was
found and how to fix it, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, ok / warn / FAIL, what was found, and how to fix it."""

    name: str
    status: str
    detail: str
    fix: str = ""


def message(err: BaseException) -> str:
    return str(err) or type(err).__name__


def format_report(checks: list[Check]) -> str:
    """One line per check (status, name, what was found), its fix below, and a verdict."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    verdict = "ready to join" if not failed else "not ready"
    lines.append(f"\n{failed} failed, {warned} warning(s): {verdict}")
    return "\n".join(lines)
