import subprocess
import sys

from fedistill.cli import pin
from fedistill.console import ProgressOnly


def test_progress_shows_tagged_lines_and_errors_once(capsys):
    show = ProgressOnly()
    for line in [
        "\x1b[92mINFO \x1b[0m:      [fedistill] round 1/3: 3 trained",
        "11/23/2026 02:33:07:INFO:[fedistill] round 1/3: 3 trained",
        "INFO :      configure_train: Sampled 3 nodes (out of 3)",
        "ERROR :     ServerApp raised an exception",
    ]:
        show(line)
    assert capsys.readouterr().out.splitlines() == ["round 1/3: 3 trained", "ServerApp raised an exception"]


def test_pin_replaces_what_the_user_gave():
    assert pin(["sites=3", "run_dir=rel", "+run_dir=x"], "run_dir", "/abs/run") == ["sites=3", 'run_dir="/abs/run"']


def test_the_command_imports_no_model_stack_before_a_handler_needs_it():
    """`fedistill status`, `register` or `--help` start in about a second, not seven: torch, Opacus,
    scipy and Flower's CLI (with fastapi) are imported only by the handlers that use them."""
    heavy = ("torch", "opacus", "scipy", "fastapi", "transformers")
    done = subprocess.run([sys.executable, "-c", "import sys, fedistill.cli; "
                           f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == []


def test_overrides_may_follow_options_in_their_order_and_anything_else_is_refused(capsys):
    import pytest

    from fedistill.cli import parse

    args = parse(["audit", "task=lm", "--canaries", "200", "seed=1", "task=digits"])
    assert args.overrides == ["task=lm", "seed=1", "task=digits"] and args.canaries == 200  # the last task= wins
    assert parse(["frontier", "--seeds", "2", "rounds=3"]).overrides == ["rounds=3"]
    with pytest.raises(SystemExit):
        parse(["audit", "task=lm", "--canaries", "200", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["status", "seed=1"])  # a command without overrides takes none


def test_overrides_written_after_the_budgets_are_overrides_and_a_word_that_is_neither_is_refused(capsys):
    import pytest

    from fedistill.cli import parse
    from fedistill.frontier import split_budgets

    args = parse(["frontier", "task=digits", "--epsilons", "1", "3", "seed=4", "--seeds", "2"])
    assert split_budgets(args) == (["task=digits", "seed=4"], [1.0, 3.0])
    with pytest.raises(SystemExit):
        parse(["frontier", "--epsilons", "1", "three"])
    assert "'three' is not an epsilon" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="at least one number"):
        split_budgets(parse(["frontier", "--epsilons", "seed=4"]))
