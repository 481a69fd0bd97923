"""A user's own labelled text: CSV, TSV, JSON Lines or parquet files (by extension), or a hub dataset.

Files are parsed strictly so that a bad row is reported with its file and line, never guessed at:
CSV with standard quoting, TSV tab-separated without quoting (GLUE's convention), JSON Lines one
object per line. Every reader gives the same thing: the file's columns in its row order, plus where
each row came from.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from datamodules.errors import DataConfigError, first_line
from datamodules.hub import DATA_HINT, prepare_for, unreachable

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
# Tried in order when --data.text_fields is not given.
USUAL_TEXT_FIELDS = (("text",), ("sentence",), ("sentence1", "sentence2"), ("premise", "hypothesis"),
                     ("question", "sentence"), ("review",))  # fmt: skip


@dataclass
class Table:
    """Columns of one file (or hub split) in row order; `where(i)` names row i's origin (`file:line`)."""

    name: str
    columns: dict[str, list[Any]]
    lines: list[int] | None = None  # file line of each row (text formats)
    label_names: tuple[str, ...] | None = None  # a hub ClassLabel's names

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def where(self, row: int) -> str:
        return f"{self.name}:{self.lines[row]}" if self.lines else f"{self.name} (row {row + 1})"


def file_format(path: str) -> str | None:
    return FORMATS.get(Path(path).suffix.lower())


def is_hub_name(value: str) -> bool:
    """`owner/name` or `name[:split]` with no file extension and nothing at that path."""
    return file_format(value) is None and not Path(value).expanduser().exists()


def task_name_of(train_file: str) -> str:
    """A readable name for the run folder: the training file's stem (`reviews.csv` -> reviews), or the hub name."""
    if file_format(train_file) is None:
        return train_file.replace("/", "_").replace(":", "_")
    stem = Path(train_file).stem
    return stem if stem not in ("train", "data") else Path(train_file).resolve().parent.name or stem


def read_table(path: str, option: str) -> Table:
    """One file by its extension; errors name the option, the file and what is wrong with it."""
    fmt = file_format(path)
    if fmt is None:
        raise DataConfigError(
            f"{option}={path!r}: unknown file type {Path(path).suffix!r}; use .csv, .tsv, .jsonl or .parquet "
            "(or a hub dataset name)"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataConfigError(f"{option}={path!r}: no such file")
    if file.stat().st_size == 0:
        raise DataConfigError(f"{option}={path!r}: the file is empty")
    if fmt == "parquet":
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as err:
            raise DataConfigError(f"{option}={path!r}: not a readable parquet file ({first_line(err)})") from None
        columns = table.to_pydict()
        lines = None
    elif fmt == "jsonl":
        columns, lines = _read_jsonl(file, path)
    else:
        columns, lines = _read_delimited(file, path, fmt)
    result = Table(path, columns, lines)
    if not columns or len(result) == 0:
        raise DataConfigError(f"{option}={path!r}: the file has no data rows")
    return result


def _read_delimited(file: Path, name: str, fmt: str) -> tuple[dict[str, list[Any]], list[int]]:
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    kind = "tab" if fmt == "tsv" else "comma"
    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True, **options)
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataConfigError(f"{name}:1: no header row (the first line names the columns)")
            if len(set(header)) != len(header):
                dupes = sorted({h for h in header if header.count(h) > 1})
                raise DataConfigError(f"{name}:1: the header repeats column(s) {dupes}")
            columns: dict[str, list[Any]] = {h: [] for h in header}
            lines: list[int] = []
            start = reader.line_num + 1
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):  # blank line
                    start = reader.line_num + 1
                    continue
                if len(row) != len(header):
                    raise DataConfigError(
                        f"{name}:{start}: expected {len(header)} {kind}-separated fields (the header's), "
                        f"found {len(row)}"
                    )
                for h, v in zip(header, row, strict=True):
                    columns[h].append(v)
                lines.append(start)
                start = reader.line_num + 1
        except csv.Error as err:
            where = f"{name}:{reader.line_num}"
            raise DataConfigError(f"{where}: the row does not parse as {fmt.upper()} ({err})") from None
        except UnicodeDecodeError as err:
            raise DataConfigError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return columns, lines


def _read_jsonl(file: Path, name: str) -> tuple[dict[str, list[Any]], list[int]]:
    rows, lines = read_jsonl_rows(file, name)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}, lines


def read_jsonl_rows(file: Path, name: str) -> tuple[list[dict[str, Any]], list[int]]:
    """One JSON object per non-blank line, as written (rows may differ in keys), and each row's line."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataConfigError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataConfigError(f"{name}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataConfigError(f"{name}:{lineno}: expected a JSON object per line, found {type(row).__name__}")
        rows.append(row)
        lines.append(lineno)
    return rows, lines


def read_hub(name: str, split: str, option: str) -> Table | None:
    """A split of a hub dataset (`owner/name`, optionally `owner/name:config`); None if it has no such split."""
    import datasets

    repo, _, config = name.partition(":")
    prepare_for(repo)
    try:
        builder = datasets.load_dataset_builder(repo, config or None)
        if builder.info.splits and split not in builder.info.splits:
            return None
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # the hub's errors have many types; each becomes one line
        if (hub := unreachable(repo, option, DATA_HINT)) is not None:
            raise hub from None
        if "split" in str(err).lower() and split != "train":
            return None
        raise DataConfigError(f"{option}={name!r}: could not load the hub dataset ({first_line(err)})") from None
    table = Table(f"{name}[{split}]", ds.to_dict())
    for feature in ds.features.values():
        if isinstance(feature, datasets.ClassLabel):  # the hub's labels are ids into these names
            table.label_names = tuple(feature.names)
    return table


# ------------------------------------------------------------------------------------------ labels
def choose_text_fields(table: Table, text_fields: Sequence[str] | None) -> tuple[str, ...]:
    present = list(table.columns)
    if text_fields:
        fields = tuple(text_fields)
        if not 1 <= len(fields) <= 2:
            raise DataConfigError(f"text_fields={list(fields)!r}: give one or two columns (a text, or a text pair)")
        if missing := [f for f in fields if f not in table.columns]:
            raise DataConfigError(f"{table.name}: no column {missing[0]!r} (--data.text_fields); columns: {present}")
        return fields
    for fields in USUAL_TEXT_FIELDS:
        if all(f in table.columns for f in fields):
            return fields
    raise DataConfigError(
        f"{table.name}: say which column(s) hold the text with --data.text_fields; columns: {present}"
    )


FLOAT32_MAX = 3.4028234663852886e38  # regression labels are stored as float32: a larger one would become inf


def _number(value: Any) -> float | None:
    """The value as a number if it reads as one (1, 1.0, "1", " 1.0 ", "nan"), else None; true/false are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except (ValueError, OverflowError):
        return None


def _is_number(value: Any) -> bool:
    """A finite number that a float32 label holds."""
    number = _number(value)
    return number is not None and math.isfinite(number) and abs(number) <= FLOAT32_MAX


def label_name(value: Any) -> str:
    """A label as its class's name: numerically equal labels are one class (1, 1.0, "1" and "1.0" are "1")."""
    number = _number(value)
    if number is not None and math.isfinite(number):
        return str(int(number)) if number.is_integer() else repr(number)
    return str(value).strip()


def _missing(value: Any) -> bool:
    """Nothing there: an empty cell, null, or the NaN a parquet file writes for one."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_label(table: Table, i: int, value: Any, label_field: str) -> None:
    """A label must be there and, when it reads as a number, be a finite one (NaN is no class)."""
    if _missing(value):
        raise DataConfigError(f"{table.where(i)}: empty label (column {label_field!r})")
    number = _number(value)
    if number is not None and not math.isfinite(number):
        raise DataConfigError(f"{table.where(i)}: label {value!r} is not a finite number (column {label_field!r})")


def infer_labels(table: Table, label_field: str, regression: bool | None) -> tuple[tuple[str, ...], bool]:
    """The label set of a training table in a stable order (numbers numerically, else alphabetically),
    and whether it is a regression (`regression=None`: yes when the labels are numbers, not all whole)."""
    if label_field not in table.columns:
        raise DataConfigError(
            f"{table.name}: no column {label_field!r} (--data.label_field); columns: {list(table.columns)}"
        )
    values = table.columns[label_field]
    for i, v in enumerate(values):
        _check_label(table, i, v, label_field)
    numbers = [_number(v) for v in values]
    numeric = all(n is not None for n in numbers)
    if regression is None:
        regression = numeric and not all(n.is_integer() for n in numbers if n is not None)
    if regression:
        if not all(_is_number(v) for v in values):
            i = next(i for i, v in enumerate(values) if not _is_number(v))
            raise DataConfigError(f"{table.where(i)}: label {values[i]!r} is not a number a float32 holds "
                                  "(a regression task)")
        return (), True
    if table.label_names is not None:
        return table.label_names, False
    names = {label_name(v) for v in values}
    if numeric and all(float(n).is_integer() for n in names):
        return tuple(sorted(names, key=lambda n: int(float(n)))), False
    return tuple(sorted(names)), False


def label_ids(
    table: Table, label_field: str, label_names: Sequence[str], regression: bool, option: str
) -> list[float] | list[int]:
    """Each row's label as the model's id (or float score); a label outside the set names its file:line."""
    if label_field not in table.columns:
        raise DataConfigError(
            f"{table.name}: no column {label_field!r} (--data.label_field); columns: {list(table.columns)}"
        )
    values = table.columns[label_field]
    if regression:
        out: list[float] = []
        for i, v in enumerate(values):
            if _missing(v) or not _is_number(v):
                raise DataConfigError(f"{table.where(i)}: label {v!r} is not a number a float32 holds "
                                      "(a regression task)")
            out.append(float(str(v).strip()) if isinstance(v, str) else float(v))
        return out
    ids = {name: i for i, name in enumerate(label_names)}
    by_index = table.label_names is not None or not any(n.isdigit() for n in label_names)
    result: list[int] = []
    for i, v in enumerate(values):
        _check_label(table, i, v, label_field)
        name = label_name(v)
        if name in ids:
            result.append(ids[name])
        elif by_index and name.isdigit() and int(name) < len(label_names) and not isinstance(v, bool):
            result.append(int(name))  # an id into the label names (e.g. a hub ClassLabel's)
        else:
            raise DataConfigError(f"{table.where(i)}: label {v!r} is not one of {list(label_names)} ({option})")
    return result


def to_dataset(table: Table, text_fields: Sequence[str], labels: list[Any] | None) -> Dataset:
    """The columns a data module tokenises: the text fields (None -> ""), `label` if any, and `idx`."""
    data: dict[str, Any] = {}
    for f in text_fields:
        if f not in table.columns:
            raise DataConfigError(f"{table.name}: no column {f!r} (--data.text_fields); columns: {list(table.columns)}")
        data[f] = pa.array(["" if _missing(v) else str(v) for v in table.columns[f]], pa.string())
    if labels is not None:
        is_float = any(isinstance(v, float) for v in labels)
        data["label"] = pa.array(labels, pa.float32() if is_float else pa.int64())
    data["idx"] = pa.array(range(len(table)), pa.int32())
    return Dataset(pa.table(data))
