"""Corpora of code or text files for causal-LM tasks, cut into records of a fixed token length.

A corpus is a list of entries, each a folder (its files with the configured suffixes,
recursively), a glob, or `stdlib:<package>`: a package of this Python's own standard
library, which makes a corpus that is on every machine and needs no download. A record
holds tokens of one file only: a file's last record is padded, never continued with the
next file.
"""

from __future__ import annotations

import dataclasses
import glob
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import ConfigError, require, require_fraction
from common.task_config import absolute_path

STDLIB = "stdlib:"


@dataclass
class CorpusConfig:
    """A causal-LM task's corpora (task.corpus): each entry a folder, a glob, or stdlib:<package>."""

    sites: list[list[str]] = field(default_factory=list)  # simulation: site i's private corpus
    public: list[str] = field(default_factory=list)       # inputs every site and the server may use
    unseen: list[str] = field(default_factory=list)       # domains no site holds, one per entry, for evaluation
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    max_length: int = 128          # tokens per record
    held_out: float = 0.2          # share of each site's files kept for evaluation
    max_records: int | None = 0    # > 0: a seeded sample of this many training records per site, and public
                                   # ones; None: by the run's device class (common/tasks/lm.py, DEVICE_RECORDS)
    eval_records: int = 0          # > 0: the same for held-out records per site and unseen domain

    def validate(self) -> None:
        require(self.max_length >= 4, f"task.corpus.max_length must be >= 4 tokens, got {self.max_length}")
        require_fraction("task.corpus.held_out", self.held_out)
        for key in ("max_records", "eval_records"):
            value = getattr(self, key)
            require(value is None and key == "max_records" or value is not None and value >= 0,
                    f"task.corpus.{key} must be >= 0 (0: no limit), got {value}")
        require(all(self.sites), f"task.corpus.sites holds an empty corpus: {self.sites}")
        require(bool(self.public), "task.corpus.public is empty: the server's warm start and the logits exchange "
                                   "need a public corpus (folders, globs or stdlib:<package>)")

    def with_absolute_paths(self) -> CorpusConfig:
        """This corpus with its folder and glob entries made absolute (stdlib:<package> entries stay)."""
        def absolute(entry: str) -> str:
            return entry if entry.startswith(STDLIB) else absolute_path(entry)

        return dataclasses.replace(self, sites=[[absolute(e) for e in site] for site in self.sites],
                                   public=[absolute(e) for e in self.public], unseen=[absolute(e) for e in self.unseen])


class CorpusError(ConfigError):
    """A corpus entry or file that cannot be used, with the fix."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(entries: list[str], suffixes: tuple[str, ...], *, what: str) -> list[Path]:
    """The files of `entries` (folders, globs, stdlib:package), sorted and without repeats."""
    files: set[Path] = set()
    for entry in entries:
        found = _entry_files(entry, suffixes)
        if not found:
            raise CorpusError(f"{what}: {entry!r} matches no file with suffix {' '.join(suffixes)}: give a folder, a glob "
                              f"such as /src/**/*.py, or {STDLIB}<package> (a package of Python's standard library)")
        files.update(found)
    return sorted(files)


def _entry_files(entry: str, suffixes: tuple[str, ...]) -> list[Path]:
    if entry.startswith(STDLIB):
        root = stdlib_root() / entry[len(STDLIB):].replace(".", "/")
        return _folder_files(root, suffixes) if root.is_dir() else []
    path = Path(entry).expanduser()
    if path.is_dir():
        return _folder_files(path, suffixes)
    if path.is_file():
        return [path.resolve()]
    return [Path(p).resolve() for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]


def _folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return [p.resolve() for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text (byte {err.start}): convert it (iconv -t utf-8) or leave it out "
                          "of the corpus") from None
    except OSError as err:
        raise CorpusError(f"{path} cannot be read ({err.strerror}): check the path and its permissions") from None


def held_out(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): a seeded `fraction` of whole files, at least one, kept for evaluation."""
    if len(files) < 2:
        raise CorpusError(f"a site's corpus needs at least 2 files to hold one out for evaluation, got {len(files)}: "
                          f"{', '.join(map(str, files))}")
    shuffled = sorted(files)
    random.Random(seed).shuffle(shuffled)
    count = min(len(files) - 1, max(1, round(fraction * len(files))))
    return sorted(shuffled[count:]), sorted(shuffled[:count])


@dataclass(frozen=True)
class Records:
    """Token records of one corpus: ids [N, L] right-padded, and the file each came from."""

    ids: torch.Tensor
    lengths: torch.Tensor  # [N] real tokens per record
    files: list[Path]      # one per record

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def cut_records(files: list[Path], tokenize, length: int, pad_id: int, *, min_tokens: int = 2) -> Records:
    """Each file's tokens (`tokenize(text) -> list[int]`) cut into records of `length` tokens;
    a file's last, shorter record is padded (kept if it has `min_tokens`, enough for one
    next-token prediction)."""
    chunks, sources = [], []
    for path in files:
        tokens = tokenize(read_text(path))
        for start in range(0, len(tokens), length):
            chunk = tokens[start:start + length]
            if len(chunk) >= min_tokens:
                chunks.append(chunk)
                sources.append(path)
    if not chunks:
        raise CorpusError(f"no record of at least {min_tokens} tokens in {len(files)} file(s) "
                          f"({', '.join(str(p) for p in files[:3])}{'...' if len(files) > 3 else ''}): the files are empty")
    return padded_records(chunks, sources, length, pad_id)


def padded_records(chunks: list[list[int]], sources: list[Path], length: int, pad_id: int) -> Records:
    """Token lists of at most `length` tokens, right-padded to it: one record each."""
    rows = [chunk + [pad_id] * (length - len(chunk)) for chunk in chunks]
    return Records(torch.tensor(rows, dtype=torch.long), torch.tensor([len(c) for c in chunks]), sources)


def sample_records(records: Records, count: int, seed: int) -> Records:
    """A seeded sample of `count` records (all when count is 0 or covers them), in corpus order:
    spread over every file, not the first files' records."""
    if not count or count >= len(records.ids):
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records.ids)), count))
    return Records(records.ids[chosen], records.lengths[chosen], [records.files[i] for i in chosen])
