"""Real Flower runs against strict sites (DP required, epsilon <= 3, delta <= 1e-5, digits only):
a request outside the policy is refused by every site, and a new run directory does not renew
a spent budget. The helpers are test_site_policy's."""

from __future__ import annotations

import pytest

from tests.test_site_policy import refusals, sites_with_policy, submit

pytestmark = pytest.mark.e2e  # real Flower simulations


@pytest.fixture(scope="module")
def strict(tmp_path_factory, cache_dir):
    """Sites that require DP at epsilon <= 3, delta <= 1e-5, load only digits, keep ledgers in their own folder."""
    root = tmp_path_factory.mktemp("strict")
    policy = root / "site.yaml"
    policy.write_text(f"epsilon: 3.0\ndelta: 1.0e-5\ntask_sources: [digits]\nledger_dir: {root / 'ledgers'}\n"
                      f"cache_dir: {cache_dir}\n")
    with sites_with_policy(root, policy) as link:
        yield root, link


@pytest.mark.parametrize(
    "request_overrides, named",
    [
        (["privacy=none"], ["site.require_dp"]),
        (["privacy.epsilon=8", "privacy.delta=1e-4"],  # a site names every setting outside its policy
         ["privacy.epsilon exceeds the site's budget 3", "privacy.delta exceeds the site's delta 1e-05"]),
    ],
    ids=["without-dp", "larger-epsilon-and-delta"],
)
def test_a_request_outside_the_policy_is_refused_by_every_site(strict, cache_dir, request_overrides, named):
    root, link = strict
    summary = submit(link, root / "-".join(request_overrides).replace("=", "_"), cache_dir, *request_overrides)
    assert summary["rounds_completed"] == 0
    assert len(summary["privacy"]["sites"]) == 2
    assert all(r["code"] == "policy" and all(n in r["reason"] for n in named) for r in refusals(summary))
    assert len(refusals(summary)) == 2
    assert not list((root / "ledgers").glob("*/ledger.json"))  # nothing recorded, nothing spent


def test_a_new_run_directory_does_not_give_the_sites_a_fresh_budget(strict, cache_dir):
    root, link = strict
    first = submit(link, root / "spend", cache_dir)
    assert first["rounds_completed"] == 1
    assert all(s["epsilon"] == pytest.approx(3.0, rel=1e-3) for s in first["privacy"]["sites"])
    again = submit(link, root / "fresh-run-dir", cache_dir)
    assert again["rounds_completed"] == 0
    assert {r["code"] for r in refusals(again)} == {"budget"}
    assert sorted(p.parent.name for p in (root / "ledgers").glob("*/ledger.json")) == ["site-0", "site-1"]
    assert not list((root / "fresh-run-dir").rglob("ledger.json"))
