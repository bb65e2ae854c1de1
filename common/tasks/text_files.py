"""Read a site's labelled texts from CSV, TSV or JSON-lines files (or a folder of them) with clear errors."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import ConfigError, require

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
FORMATS = ("auto", "csv", "tsv", "jsonl")
# Under no header, a column left at its default name stands for the usual `text<sep>label` layout.
DEFAULT_NAME = {"text_column": "text", "label_column": "label"}
DEFAULT_INDEX = {"text_column": 0, "label_column": 1}
_INT = re.compile(r"-?[0-9]+")


@dataclass
class TextDataConfig:
    """Where a text task's labelled texts are and how to read them (task.data)."""

    path: str | None = None    # a CSV, TSV or JSON-lines file, or a folder of them
    format: str = "auto"       # auto (from the suffix) | csv | tsv | jsonl
    text_column: str = "text"  # a column name, or a 0-based index
    label_column: str = "label"
    header: str = "auto"       # auto | true | false
    labels: list[str] = field(default_factory=list)  # class names in order; []: those of the teacher split
    max_length: int = 64       # tokens per text (longer texts are truncated)

    def validate(self) -> None:
        require(self.format in FORMATS, f"task.data.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        require(self.max_length >= 4, f"task.data.max_length must be >= 4 tokens, got {self.max_length}")
        require(len(set(self.labels)) == len(self.labels), f"task.data.labels repeats a class: {self.labels}")
        require(self.path is not None,
                "task=text needs the labelled texts: task.data.path=/path/to/file.csv (a CSV, TSV or JSON-lines "
                "file, or a folder of them, with a text and a label column; see task.data in conf/task/text.yaml)")


class DataFileError(ConfigError):
    """A data file fedistill cannot use: the message names the file, the line and the fix."""


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str  # raw label as written (a name, or an integer written as text)
    source: str  # "path:line", 1-based; for a file with a header the header is line 1


def read_texts(
    path: Path, *, format: str = "auto", text_column: str = "text", label_column: str = "label", header: str = "auto"
) -> list[LabelledText]:
    """Every record of `path` (a file, or the .csv/.tsv/.jsonl files of a folder sorted by name)."""
    path = Path(path)
    if format not in FORMATS:
        raise DataFileError(f"task.data.format={format!r} is not a format; use one of {', '.join(FORMATS)}")
    has_header = _parse_header(header)
    columns = (("text_column", _parse_column("text_column", text_column)),
               ("label_column", _parse_column("label_column", label_column)))
    records: list[LabelledText] = []
    for file in _data_files(path):
        fmt = format if format != "auto" else _format_of(file)
        text = _decode(file)
        if fmt == "jsonl":
            got = _read_jsonl(file, text, columns)
        else:
            got = _read_delimited(file, text, fmt, columns, has_header)
        if not got:
            raise DataFileError(f"{file} has no records: add labelled texts to it or remove it from task.data.path")
        records.extend(got)
    return records


def label_names(records: list[LabelledText]) -> list[str]:
    """The distinct labels, in numeric order when every label is an integer, else sorted as text."""
    labels = list(dict.fromkeys(r.label for r in records))
    if labels and all(_INT.fullmatch(x) for x in labels):
        # "3" and "03" are one class (encode_labels agrees): keep the first spelling seen.
        by_value = {}
        for x in labels:
            by_value.setdefault(int(x), x)
        return [by_value[v] for v in sorted(by_value)]
    return sorted(labels)


def encode_labels(records: list[LabelledText], names: list[str]) -> np.ndarray:
    """Each record's class index in `names` (int64 [N])."""
    index = {n: i for i, n in enumerate(names)}
    by_value: dict[int, int] = {}
    if names and all(_INT.fullmatch(n) for n in names):
        for i, n in enumerate(names):
            by_value.setdefault(int(n), i)
    out = np.empty(len(records), dtype=np.int64)
    for k, r in enumerate(records):
        i = index.get(r.label)
        if i is None and by_value and _INT.fullmatch(r.label):
            i = by_value.get(int(r.label))
        if i is None:
            raise DataFileError(
                f"{r.source}: label {r.label!r} is not one of the classes {names}; "
                "fix the label or list every class in task.data.labels"
            )
        out[k] = i
    return out


def _parse_header(header) -> bool | None:
    if isinstance(header, bool):
        return header
    value = {"auto": None, "true": True, "false": False}.get(str(header).strip().lower(), "bad")
    if value == "bad":
        raise DataFileError(f"task.data.header={header!r} is not allowed; use auto, true or false")
    return value


def _parse_column(key: str, value) -> str | int:
    # Hydra turns `task.data.text_column=0` into an int, so ints count as indices too.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip():
        value = value.strip()
        return int(value) if value.isascii() and value.isdigit() else value
    raise DataFileError(f"task.data.{key}={value!r} is not a column: give a column name or a 0-based index")


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataFileError(f"{path} does not exist; give the data with task.data.path=/path/to/file.csv")
    if not path.is_dir():
        return [path]
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES), key=lambda p: p.name)
    if not files:
        raise DataFileError(
            f"{path} holds no data files: only files ending in {', '.join(SUFFIXES)} are read "
            "(sub-folders are not); add one, or point task.data.path at a file"
        )
    return files


def _format_of(file: Path) -> str:
    fmt = SUFFIXES.get(file.suffix.lower())
    if fmt is None:
        raise DataFileError(
            f"{file}: cannot tell the format from the suffix {file.suffix!r}; set task.data.format=csv|tsv|jsonl"
        )
    return fmt


def _decode(file: Path) -> str:
    data = file.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # b"\n" never occurs inside a UTF-8 sequence, so counting newlines before the bad byte is exact.
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFileError(
            f"{file}:{line}: not UTF-8 text (first bad byte on line {line}); re-save the file as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {file.name} > utf8-{file.name}"
        ) from None


def _record(file: Path, line: int, text: str, label: str) -> LabelledText:
    text, label = text.strip(), label.strip()
    if not text:
        raise DataFileError(f"{file}:{line}: the text column is empty; write the text or delete the line")
    if not label:
        raise DataFileError(f"{file}:{line}: the label column is empty; write the label or delete the line")
    return LabelledText(text=text, label=label, source=f"{file}:{line}")


def _read_delimited(file: Path, text: str, fmt: str, columns, header: bool | None) -> list[LabelledText]:
    stream = io.StringIO(text, newline="")
    # TSV text (AG News, for one) is full of literal quote characters: only CSV has quoting.
    if fmt == "tsv":
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(stream, delimiter=",")
    rows, end = [], 0
    try:
        for row in reader:
            # line_num is the record's last line (quoted newlines): it starts after the previous one.
            start, end = end + 1, reader.line_num
            if any(cell.strip() for cell in row):
                rows.append((start, row))
    except csv.Error as e:
        raise DataFileError(f"{file}:{end + 1}: cannot read this {fmt.upper()} record ({e}); fix the line "
                            "(an unclosed quote?) or set task.data.format") from None
    if not rows:
        return []
    indices, skip = _resolve_columns(file, rows[0][1], columns, header)
    out = []
    for line, row in rows[1:] if skip else rows:
        if len(row) <= max(indices):
            raise DataFileError(
                f"{file}:{line}: the row has {len(row)} column(s) but column {max(indices)} (0-based) is needed; "
                "fix the row (an unclosed quote?), check the delimiter (task.data.format) "
                "or set task.data.text_column/label_column"
            )
        out.append(_record(file, line, row[indices[0]], row[indices[1]]))
    return out


def _resolve_columns(file: Path, first: list[str], columns, header: bool | None) -> tuple[list[int], bool]:
    """Column indices for text and label, and whether the first row is a header."""
    cells = [c.strip() for c in first]
    names = [(key, c) for key, c in columns if isinstance(c, str)]
    if header is None:
        found = bool(names) and all(c in cells for _, c in names)
        # A name the default layout cannot stand for must be in a header: report it missing there.
        header = found or any(c != DEFAULT_NAME[key] for key, c in names)
    if header:
        for key, c in names:
            if c not in cells:
                raise DataFileError(f"{file}: the header has no column {c!r} (its columns: {cells}); "
                                    f"set task.data.{key}= to one of them or to a 0-based index")
        return [c if isinstance(c, int) else cells.index(c) for _, c in columns], True
    indices = []
    for key, c in columns:
        if isinstance(c, str) and c != DEFAULT_NAME[key]:
            raise DataFileError(f"{file}: task.data.{key}={c!r} is a name but the file has no header row; "
                                f"give a 0-based index (task.data.{key}=0) or set task.data.header=true")
        indices.append(c if isinstance(c, int) else DEFAULT_INDEX[key])
    return indices, False


def _read_jsonl(file: Path, text: str, columns) -> list[LabelledText]:
    for key, c in columns:
        if isinstance(c, int):
            raise DataFileError(f"{file}: JSON lines name their fields, so task.data.{key}={c} cannot be an index; "
                                f"set task.data.{key}= to a key")
    out = []
    for line, raw in enumerate(io.StringIO(text, newline=""), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{file}:{line}: not valid JSON ({e.msg}); write one object per line, "
                                'like {"text": "...", "label": "..."}') from None
        if not isinstance(obj, dict):
            raise DataFileError(f"{file}:{line}: a JSON {type(obj).__name__}, not an object; write one object per "
                                'line, like {"text": "...", "label": "..."}')
        for key, c in columns:
            if c not in obj:
                raise DataFileError(f"{file}:{line}: no key {c!r} (this line has {list(obj)}); add it or set "
                                    f"task.data.{key}= to the right key")
        (_, text_key), (_, label_key) = columns
        if not isinstance(obj[text_key], str):
            raise DataFileError(f"{file}:{line}: {text_key!r} must be a JSON string, got {json.dumps(obj[text_key])}")
        out.append(_record(file, line, obj[text_key], _json_label(file, line, obj[label_key])))
    return out


def _json_label(file: Path, line: int, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise DataFileError(f"{file}:{line}: the label must be a string or an integer, got {json.dumps(value)}; fix it")
