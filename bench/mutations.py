"""Do the tests fail when a privacy-critical line is removed or inverted?

Each mutation changes one line of the project's code, runs the tests that claim to guard
it, and restores the line. A mutation that leaves those tests green is a test that does
not test what it claims. Prints a table and writes bench/results/mutations.json.

    python -m bench.mutations [--only NAME]

It edits the checkout in place (and always restores it): do not run it beside other work
on the same tree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    line: str         # the line as it stands (stripped), found exactly once
    replacement: str  # what it becomes (same indentation)
    tests: tuple[str, ...]


APP, ROUND, ADMISSION, DP = "client/app.py", "client/round.py", "client/admission.py", "client/dp_train.py"
LEDGER, POLICY, REQUEST = "common/privacy.py", "common/policy.py", "common/request.py"
ACCOUNTING = "common/accounting.py"
T_APP, T_ROUND, T_DP = "tests/client/test_app.py", "tests/client/test_round.py", "tests/client/test_dp_train.py"
T_LEDGER, T_EXCHANGE, T_POLICY = "tests/common/test_privacy.py", "tests/server/test_exchange.py", "tests/common/test_policy.py"
T_REQUEST, T_DIFFERENTIAL = "tests/common/test_request.py", "tests/client/test_differential.py"

MUTATIONS = [
    Mutation("noise added", DP, "noise_multiplier=noise_multiplier,", "noise_multiplier=0.0,",
             (f"{T_DP}::test_more_noise_moves_the_weights_further_at_the_same_clipping",)),
    Mutation("noise not from the config seed", DP,
             "return torch.Generator().manual_seed(secrets.randbits(63) if privacy.enabled else seed)",
             "return torch.Generator().manual_seed(seed)",
             (f"{T_DP}::test_dp_noise_is_not_reproducible_from_the_config_seed",)),
    Mutation("clipping on", DP, "max_grad_norm=privacy.max_grad_norm,", "max_grad_norm=1e9,",
             (f"{T_DP}::test_per_sample_gradients_are_clipped",)),
    Mutation("sampler at the accountant's rate", DP,
             "loader = DPDataLoader(data, sample_rate=plan.sample_rate, generator=generator)  # int(1/q) steps per pass",
             "loader = DPDataLoader(data, sample_rate=4 * plan.sample_rate, generator=generator)",
             (f"{T_DP}::test_batches_are_drawn_at_the_sample_rate_the_accountant_charges",)),
    Mutation("ledger written before training", LEDGER, "self._reserve(limit, noise, sample_rate, steps, run, round)",
             "pass", (f"{T_ROUND}::test_the_ledger_holds_the_round_before_training_starts",)),
    Mutation("release without DP recorded", LEDGER,
             "self._append(LedgerEntry(0.0, sample_rate, steps, run, round, time.time(), dp=False))", "return None",
             (f"{T_ROUND}::test_a_round_without_dp_is_recorded_and_later_dp_claims_are_refused",)),
    Mutation("RDP series summed to Opacus's last term", ACCOUNTING, "if max(log_s0, log_s1) < _STOP:", "if True:",
             (f"{T_LEDGER}::test_the_rdp_of_a_step_is_opacus_compute_rdp_to_the_bit",)),
    Mutation("budget checked at reservation", LEDGER, "if any(eps > b.epsilon for eps, b in zip(after, limits)):",
             "if False:", (f"{T_LEDGER}::test_reserve_refuses_past_the_budget_and_records_nothing",)),
    Mutation("ledger refuses other records", LEDGER, "if recorded != self.data:", "if False:",
             (f"{T_LEDGER}::test_a_ledger_refuses_other_records",)),
    Mutation("ledger entries read as exactly their types", LEDGER, "if type(item) not in ENTRY_TYPES[key]:",
             "if False:", ("tests/test_bad_input.py::test_a_corrupt_ledger_is_refused_or_read_as_exactly_what_it_holds",)),
    Mutation("ledger refuses another partition", LEDGER,
             "self._refuse_overlapping_partition()  # early, before any calibration; _append checks again", "pass",
             (f"{T_LEDGER}::test_a_new_ledger_refuses_the_same_data_set_under_another_partition",)),
    Mutation("partition re-checked at the first write", LEDGER, "self._refuse_overlapping_partition()", "pass",
             (f"{T_LEDGER}::test_two_new_ledgers_cannot_both_pass_the_partition_check",)),
    Mutation("rounds trained once per run", LEDGER, "if round in trained:", "if False:",
             (f"{T_ROUND}::test_a_round_is_trained_once_per_run_however_often_it_is_asked_for",)),
    Mutation("replay and round count checked under the ledger's lock", LEDGER,
             "with self._locked():  # the checks and the write under one lock", "with open(os.devnull):",
             (f"{T_ROUND}::test_two_concurrent_requests_for_one_round_train_it_once",)),
    Mutation("loss withheld under DP", ROUND, "if not config.privacy.enabled:", "if True:",
             (f"{T_ROUND}::test_a_dp_round_reserves_in_the_ledger_and_replies_only_what_may_leave_the_site",)),
    Mutation("count withheld", ROUND,
             "metrics = MetricRecord({P.DP_STEPS: result.steps, P.SAMPLE_RATE: plan.sample_rate,",
             'metrics = MetricRecord({"num-examples": len(site.data), P.DP_STEPS: result.steps, '
             "P.SAMPLE_RATE: plan.sample_rate,",
             (f"{T_ROUND}::test_a_dp_round_reserves_in_the_ledger_and_replies_only_what_may_leave_the_site",)),
    Mutation("this run's spend only", ROUND, "metrics[P.EPSILON_SPENT] = ledger.epsilon_of_run(run, privacy.delta)",
             "metrics[P.EPSILON_SPENT] = ledger.epsilon_spent(privacy.delta)",
             (f"{T_ROUND}::test_a_reply_reports_this_runs_spend_and_not_the_sites_spend_in_other_runs",)),
    Mutation("records read after every check that needs none", ROUND,
             "check_assets(site.assets, site.policy, request)", "site.data; check_assets(site.assets, site.policy, request)",
             (f"{T_ROUND}::test_the_records_are_read_only_after_every_check_that_needs_none_of_them",)),
    Mutation("server drops unlisted items", "server/rounds.py", "extra = sorted(P.reply_items(content) - allowed)",
             "extra = []", (f"{T_EXCHANGE}::test_a_reply_holding_anything_a_site_may_not_release_is_dropped",)),
    Mutation("policy enforced", ADMISSION, "problems = policy.violations(request)", "problems = []",
             (f"{T_APP}::test_a_request_outside_the_sites_policy_is_refused_before_anything_is_loaded",)),
    Mutation("policy: epsilon", POLICY, "if asked.epsilon > self.epsilon:", "if False:",
             (f"{T_POLICY}::test_each_request_outside_the_policy_is_named_without_repeating_its_value",)),
    Mutation("policy: DP required", POLICY, "if self.require_dp:", "if False:",
             (f"{T_POLICY}::test_each_request_outside_the_policy_is_named_without_repeating_its_value",)),
    Mutation("policy: delta below 1/N of the site's records", POLICY, "if records and self.delta >= 1 / records:",
             "if False:", (f"{T_POLICY}::test_the_sites_delta_must_be_below_one_over_its_record_count",
                           f"{T_ROUND}::test_a_sites_delta_at_or_above_one_over_its_records_makes_it_refuse_every_round")),
    Mutation("no interpolation: a task is a name", REQUEST, "if not TASK_NAME.fullmatch(request.task):", "if False:",
             (f"{T_REQUEST}::test_a_request_outside_the_schema_is_refused",
              f"{T_APP}::test_a_request_outside_the_schema_gets_one_fixed_reason")),
    Mutation("no interpolation: a source is a name or module:factory", REQUEST,
             "if not SOURCE.fullmatch(request.source):", "if False:",
             (f"{T_REQUEST}::test_a_request_outside_the_schema_is_refused",
              f"{T_APP}::test_a_request_outside_the_schema_gets_one_fixed_reason")),
    Mutation("a request holds only the schema's keys", REQUEST,
             "if not isinstance(value, dict) or set(value) != set(fields):",
             "if not isinstance(value, dict) or not set(fields) <= set(value):",
             (f"{T_REQUEST}::test_a_request_outside_the_schema_is_refused",
              f"{T_APP}::test_a_request_outside_the_schema_gets_one_fixed_reason")),
    Mutation("a request is checked against each section's rules", REQUEST, "section.validate()", "pass",
             (f"{T_REQUEST}::test_every_string_of_the_schema_is_one_of_its_names",)),
    Mutation("refusals repeat nothing of the request", ADMISSION,
             "return Refusal(P.REFUSAL_BAD_REQUEST, RequestError.REASON, err.detail)",
             "return Refusal(P.REFUSAL_BAD_REQUEST, err.detail)",
             (f"{T_APP}::test_a_request_outside_the_schema_gets_one_fixed_reason",
              f"{T_DIFFERENTIAL}::test_sites_differing_in_one_record_answer_every_request_alike")),
    Mutation("replies held to the site's bound", APP, "sleep(left)", "pass",
             (f"{T_APP}::test_a_site_with_its_own_records_holds_every_reply_until_its_bound",)),
    Mutation("request checked before budget", ADMISSION,
             "check_finite(content[P.ARRAYS], exchange.max_abs_value)", "pass",
             (f"{T_ROUND}::test_a_malformed_request_is_refused_before_any_budget_is_spent",)),
    Mutation("FedMD state kept", ADMISSION, "if P.STUDENT_STATE in state.array_records:", "if False:",
             (f"{T_ROUND}::test_broadcast_logits_keeps_each_sites_own_student_of_its_own_shape",)),
    Mutation("consensus fitted", ADMISSION,
             "site.outputs.fit(student, consensus, fit, seed=seed, device=site.task.device)",
             "pass", (f"{T_ROUND}::test_the_consensus_is_fitted_before_private_training",)),
    Mutation("consensus kept only once learned", "server/exchange.py",
             "report = self.outputs.fit(global_student, combined, self.config.server, seed=seed, device=self.device)",
             "self.consensus = combined; report = self.outputs.fit(global_student, combined, self.config.server, seed=seed, "
             "device=self.device)",
             (f"{T_EXCHANGE}::test_the_consensus_is_kept_only_once_the_global_student_has_learned_it",)),
]


def mutated_text(mutation: Mutation) -> tuple[str, str]:
    """(the file's text, the text with the mutation applied); SystemExit unless the line is there once."""
    path = ROOT / mutation.path
    original = path.read_text()
    lines = original.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.strip() == mutation.line]
    if len(found) != 1:
        raise SystemExit(f"{mutation.name}: the line {mutation.line!r} is in {mutation.path} {len(found)} times, not once")
    i = found[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + mutation.replacement + "\n"
    mutated = "".join(lines)
    compile(mutated, str(path), "exec")  # a mutation must be killed by a test, not by a syntax error
    return original, mutated


def apply(mutation: Mutation) -> str:
    """Mutate the file; returns its original text."""
    original, mutated = mutated_text(mutation)
    (ROOT / mutation.path).write_text(mutated)
    return original


def killed(mutation: Mutation) -> bool:
    original = apply(mutation)
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
                                cwd=ROOT, capture_output=True, text=True)
    finally:
        (ROOT / mutation.path).write_text(original)
    return result.returncode != 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only mutations whose name starts with this")
    args = parser.parse_args()
    rows = []
    print("| mutation | file | test that should fail | killed |\n|---|---|---|---|")
    for m in MUTATIONS:
        if args.only and not any(m.name.startswith(o) for o in args.only):
            continue
        row = {"mutation": m.name, "file": m.path, "line": m.line, "replacement": m.replacement,
               "tests": list(m.tests), "killed": killed(m)}
        rows.append(row)
        tests = ", ".join(t.split("::")[1] for t in m.tests)
        print(f"| {m.name}: `{m.line}` -> `{m.replacement}` | {m.path} | {tests} | {'yes' if row['killed'] else 'NO'} |",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mutations.json").write_text(json.dumps(rows, indent=2))
    survivors = [r["mutation"] for r in rows if not r["killed"]]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutations killed" + (f"; survivors: {survivors}" if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
