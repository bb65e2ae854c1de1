"""The README and the site guide say what the commands do today: every `fedistill` command they show
parses as shown (its overrides too), and every transcript (`$ fedistill ...` and what follows it)
starts with what the command prints now."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from fedistill import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "deploy" / "SITE_GUIDE.md"]
TAKES_OVERRIDES = ("simulate", "submit", "assets", "kit", "frontier", "audit")


def shell_lines(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) of every `fedistill ...` line in the file's ```bash blocks, continuations joined,
    comments dropped; lines with a placeholder (`...`, `<name>`) are left out."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["fedistill"] and not any("..." in a or "<" in a for a in argv):
                found.append((f"{path.name}: {line.strip()[:70]}", argv))
    return found


COMMANDS = [case for doc in DOCS for case in shell_lines(doc)]


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_every_command_shown_parses_with_its_overrides(argv):
    args = cli.parser().parse_args(argv[1:])  # argparse exits (a test failure) on anything it does not know
    if args.command in TAKES_OVERRIDES:
        overrides = [o for o in args.overrides if not o.startswith(("site.", "resume="))]
        load_config(overrides)


def transcripts(path: Path) -> list[tuple[str, str]]:
    """(command, the first line the document shows it printing) of each `$ fedistill ...` line."""
    lines = path.read_text().splitlines()
    return [(line[2:], lines[i + 1]) for i, line in enumerate(lines) if line.startswith("$ fedistill ")]


TRANSCRIPTS = [case for doc in DOCS for case in transcripts(doc)]


def test_the_documents_hold_transcripts_and_commands():
    assert len(TRANSCRIPTS) >= 3 and len(COMMANDS) >= 40


@pytest.mark.parametrize("command, first_line", TRANSCRIPTS, ids=[c for c, _ in TRANSCRIPTS])
def test_each_transcript_starts_with_what_the_command_prints_today(command, first_line, tmp_path):
    argv = shlex.split(command)
    done = subprocess.run([sys.executable, "-m", "fedistill.cli", *argv[1:]], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)},
                          timeout=300)
    printed = (done.stdout + done.stderr).strip().splitlines()
    assert printed and printed[0] == first_line, done.stdout + done.stderr
