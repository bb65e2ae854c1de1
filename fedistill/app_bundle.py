"""The Flower app's shipped files, staged into a folder of their own before Flower bundles them.

`flwr run` and `flwr build` list every file under the app folder before they keep the ones that
`fab-include` names; in a checkout that is the whole `.venv` (about 70,000 files, 10-15 s of CPU
per run). A folder holding only the files the include patterns match (with pyproject.toml and
.gitignore, which Flower reads to filter) gives Flower the same input byte for byte, so the bundle
and its SHA-256 (what sites pin) are the same as building from the app folder itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Iterator

GLOB_CHARACTERS = set("*?[")
ALWAYS_STAGED = ("pyproject.toml", ".gitignore")
STAGED_NAME = "app"


def app_folder(path: Path) -> Path:
    """`path`, checked to be a Flower app's folder (a pyproject.toml with [tool.flwr.app]); ValueError says the fix."""
    pyproject = path / "pyproject.toml"
    try:
        is_app = "app" in tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {})
    except (OSError, tomllib.TOMLDecodeError):
        is_app = False
    if not is_app:
        raise ValueError(f"{path.resolve()} is not a Flower app's folder (no pyproject.toml with [tool.flwr.app]): run "
                         "this in the folder of the app release you vetted, or name that folder (`fedistill app-hash DIR`, "
                         "`--app DIR` for submit and kit)")
    return path


def include_patterns(app_dir: Path) -> list[str] | None:
    """`[tool.flwr.app] fab-include` of the app's pyproject.toml, or None where it names none."""
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")


def _walk_roots(patterns: list[str]) -> set[str]:
    """The folders a pattern can match under: its leading components without a wildcard ('' for all)."""
    roots = set()
    for pattern in patterns:
        literal = []
        for part in pattern.strip("/").split("/")[:-1]:
            if GLOB_CHARACTERS & set(part):
                break
            literal.append(part)
        roots.add("/".join(literal))
    return roots


def included_files(app_dir: Path, patterns: list[str]) -> list[str]:
    """The app's files (relative POSIX paths, no symlinks, as Flower skips them) that `patterns` match."""
    from flwr.cli.utils import build_pathspec  # here: it imports Flower's CLI and fastapi (a second per command)

    spec = build_pathspec(patterns)
    found = set()
    for root in _walk_roots(patterns):
        for folder, _, names in os.walk(app_dir / root):
            for name in names:
                path = Path(folder) / name
                relative = path.relative_to(app_dir).as_posix()
                if not path.is_symlink() and spec.match_file(relative):
                    found.add(relative)
    return sorted(found)


@contextlib.contextmanager
def staged_app(app_dir: Path) -> Iterator[Path]:
    """`with staged_app(app_dir) as folder:` a temporary folder to hand Flower in place of `app_dir`.

    An app whose pyproject.toml names no `fab-include` is handed over as it is: Flower then ships
    everything it does not exclude itself, which only a full walk can find.
    """
    app_dir = app_dir.resolve()
    patterns = include_patterns(app_dir)
    if not patterns:
        yield app_dir
        return
    with tempfile.TemporaryDirectory(prefix="fedistill-app-") as staging:
        # A fixed name: Flower refuses an app folder whose name is not letters, digits and hyphens.
        staged = Path(staging) / STAGED_NAME
        names = [name for name in ALWAYS_STAGED if (app_dir / name).is_file()]
        for relative in [*names, *included_files(app_dir, patterns)]:
            (staged / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(app_dir / relative, staged / relative)
        yield staged
