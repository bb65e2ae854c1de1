"""The staged app folder gives Flower the same bundle (and so the same hash sites pin) as the checkout."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import validate_project_name

from fedistill.app_bundle import staged_app
from fedistill.cli import APP_DIR
from fedistill.deployment import app_hash


def fab_sha256(folder: Path) -> str:
    return hashlib.sha256(build_fab_from_disk(folder)).hexdigest()


def test_the_staged_folder_builds_the_same_bundle_as_the_checkout():
    with staged_app(APP_DIR) as staged:
        assert staged != APP_DIR and not (staged / ".venv").exists() and not (staged / "tests").exists()
        assert fab_sha256(staged) == fab_sha256(APP_DIR)


def test_flower_accepts_the_staged_folder_and_it_builds_the_checkouts_bundle():
    """`flwr build` itself on the staged folder; Flower also checks the folder's name, which a
    random temporary name would fail now and then."""
    with staged_app(APP_DIR) as staged:
        validate_project_name(staged.name, "the staged folder's name")
    assert app_hash(APP_DIR) == fab_sha256(APP_DIR)


def write_app(folder: Path, include: str | None) -> Path:
    lines = ['[project]\nname = "app"\nversion = "1.0.0"\n']
    if include is not None:
        lines.append(f'[tool.flwr.app]\nfab-include = {include}\n')
    (folder / "pyproject.toml").write_text("".join(lines))
    for relative in ("pkg/a.py", "pkg/sub/b.py", "pkg/notes.txt", "pkg/__pycache__/a.pyc", "other/c.py"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(relative)
    (folder / "pkg" / "link.py").symlink_to(folder / "other" / "c.py")
    return folder


def staged_files(staged: Path) -> set[str]:
    return {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}


def test_only_what_the_include_patterns_match_is_staged_and_symlinks_are_not(tmp_path):
    app = write_app(tmp_path, '["pkg/**/*.py"]')
    with staged_app(app) as staged:
        assert staged_files(staged) == {"pyproject.toml", "pkg/a.py", "pkg/sub/b.py"}
        assert (staged / "pkg/sub/b.py").read_text() == "pkg/sub/b.py"


def test_a_pattern_starting_with_a_wildcard_is_matched_anywhere(tmp_path):
    app = write_app(tmp_path, '["**/c.py"]')
    with staged_app(app) as staged:
        assert staged_files(staged) == {"pyproject.toml", "other/c.py"}


def test_an_app_without_include_patterns_is_handed_to_flower_as_it_is(tmp_path):
    app = write_app(tmp_path, None)
    with staged_app(app) as staged:
        assert staged == app.resolve()
