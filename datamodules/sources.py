"""Raw GLUE splits from local files (GLUE's TSV layout or the hub's parquet export) or the hub.

Every source yields the same Dataset: the task's text fields, `label` (ClassLabel in the hub's
order, float32 for STS-B) and `idx` (row number), in the file's own row order, which the
few-shot split depends on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, DatasetInfo, Features, Value

from datamodules.cache import file_identity
from datamodules.errors import DataConfigError, first_line
from datamodules.tasks import GLUE_TASKS, TaskInfo

HUB_DATASET = "nyu-mll/glue"
STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's fields sit in GLUE's TSV files: header names, or column numbers when headerless."""

    columns: dict[str, str | int]
    label: str | int
    header: bool = True
    num_columns: int | None = None  # only for headerless files
    files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"})


TSV_LAYOUTS: dict[str, TsvLayout] = {
    # CoLA's train/dev have no header: source, label, original label, sentence.
    "cola": TsvLayout({"sentence": 3}, 1, header=False, num_columns=4),
    "sst2": TsvLayout({"sentence": "sentence"}, "label"),
    # MRPC's header starts with a UTF-8 BOM ("\ufeffQuality"); the file is read as utf-8-sig.
    "mrpc": TsvLayout({"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "stsb": TsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "score"),
    "qqp": TsvLayout({"question1": "question1", "question2": "question2"}, "is_duplicate"),
    "mnli": TsvLayout(
        {"premise": "sentence1", "hypothesis": "sentence2"},
        "gold_label",
        files={
            "train": "train.tsv",
            "validation_matched": "dev_matched.tsv",
            "validation_mismatched": "dev_mismatched.tsv",
        },
    ),
    "qnli": TsvLayout({"question": "question", "sentence": "sentence"}, "label"),
    "rte": TsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
}


def raw_splits(task: TaskInfo) -> tuple[str, ...]:
    """The labelled splits a task has, by hub name: train, then GLUE's dev set(s)."""
    return tuple(TSV_LAYOUTS[task.name].files)


def eval_split(task: TaskInfo, test_split: str) -> str:
    """The GLUE dev split that serves as one of our test sets (GLUE's own test labels are hidden)."""
    return "validation" + test_split.removeprefix("test")


def features(task: TaskInfo) -> Features:
    label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features({**{f: Value("string") for f in task.text_fields}, "label": label, "idx": Value("int32")})


# ----------------------------------------------------------------------------------------- locating
def task_folder(task: TaskInfo, data_dir: str | Path) -> Path:
    """`data_dir` is the GLUE root (RTE/, SST-2/ or the hub's rte/, sst2/) or the task folder itself."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataConfigError(f"data_dir={str(data_dir)!r} is not a directory")
    for name in (task.glue_dir, task.name):
        if (root / name).is_dir():
            return root / name
    own_names = {task.glue_dir.lower(), task.name}
    other = {n for t in GLUE_TASKS.values() if t is not task for n in (t.glue_dir.lower(), t.name)}
    if root.name.lower() in own_names or (root.name.lower() not in other and _holds_split_files(task, root)):
        return root
    raise DataConfigError(f"data_dir={str(data_dir)!r} has no {task.glue_dir}/ folder for task {task.name}")


def _holds_split_files(task: TaskInfo, folder: Path) -> bool:
    return any((folder / f).is_file() or _parquet_files(folder, s) for s, f in TSV_LAYOUTS[task.name].files.items())


def _parquet_files(folder: Path, split: str) -> list[Path]:
    """The hub's export names shards `<split>-00000-of-00001.parquet`; also accept `<split>.parquet`."""
    for pattern in (f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet"):
        if found := sorted(folder.glob(pattern)):
            return found
    return []


def split_files(task: TaskInfo, split: str, data_dir: str | Path) -> list[Path]:
    """The file(s) holding one split: the TSV if present, else parquet; a missing one is named."""
    return _tsv_or_parquet(task_folder(task, data_dir), TSV_LAYOUTS[task.name].files[split], split, data_dir,
                           f"task {task.name}, split {split}")  # fmt: skip


def _tsv_or_parquet(folder: Path, tsv_name: str, split: str, data_dir: str | Path, what: str) -> list[Path]:
    tsv = folder / tsv_name
    if tsv.is_file():
        return [tsv]
    if parquet := _parquet_files(folder, split):
        return parquet
    raise DataConfigError(f"data_dir={str(data_dir)!r} lacks {tsv} ({what}; no {split}-*.parquet either)")


def count_rows(task: TaskInfo, split: str, data_dir: str | Path) -> int:
    """Row count without parsing, for failing fast on an impossible few-shot split."""
    files = split_files(task, split, data_dir)
    if files[0].suffix == ".parquet":
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    newlines, last = 0, b"\n"
    with open(files[0], "rb") as f:
        while chunk := f.read(1 << 22):
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    lines = newlines + (last != b"\n")
    return lines - TSV_LAYOUTS[task.name].header


def source_fingerprint(task: TaskInfo, split: str, data_dir: str | Path | None) -> str:
    """Identifies the raw data for the on-disk cache: file path, size and mtime, or the hub name."""
    if data_dir is None:
        return f"hub:{HUB_DATASET}/{task.name}/{split}"
    return ";".join(":".join(map(str, file_identity(f))) for f in split_files(task, split, data_dir))


# ------------------------------------------------------------------------------------------ loading
def load_raw_split(task: TaskInfo, split: str, data_dir: str | Path | None = None) -> Dataset:
    """One labelled split, from `data_dir` when given, else from the hub."""
    if split not in TSV_LAYOUTS[task.name].files:
        raise DataConfigError(f"split={split!r} is not a labelled split of {task.name}; use one of {raw_splits(task)}")
    if data_dir is None:
        return _from_hub(task, split)
    files = split_files(task, split, data_dir)
    if files[0].suffix == ".parquet":
        table = pa.concat_tables([pq.read_table(f) for f in files])
        return _canonical(task, Dataset(table), where=str(files[0].parent / f"{split}*.parquet"))
    return read_tsv(task, files[0])


def _from_hub(task: TaskInfo, split: str) -> Dataset:
    import datasets

    try:
        ds = datasets.load_dataset(HUB_DATASET, task.name, split=split)
    except Exception as err:  # offline, hub changes, ...: say what to do instead
        raise DataConfigError(
            f"data_dir=None: could not load {HUB_DATASET}/{task.name} ({split}) from the hub ({first_line(err)}); "
            "pass data_dir=<GLUE folder> to read local files"
        ) from err
    return _canonical(task, ds, where=f"{HUB_DATASET}/{task.name}/{split}")


def _canonical(task: TaskInfo, ds: Dataset, where: str) -> Dataset:
    """Same columns, order and types as `read_tsv`, with the labels checked against the task."""
    wanted = [*task.text_fields, "label", "idx"]
    if missing := [c for c in wanted if c not in ds.column_names and c != "idx"]:
        raise DataConfigError(f"{where}: columns {missing} missing for task {task.name}; found {ds.column_names}")
    if "idx" not in ds.column_names:
        ds = ds.add_column("idx", list(range(len(ds))))
    ds = ds.select_columns(wanted)
    labels = ds.data.column("label")
    if task.is_regression:
        labels = pc.cast(labels, pa.float64())
    low, high = pc.min(labels).as_py(), pc.max(labels).as_py()
    allowed = STSB_RANGE if task.is_regression else (0, task.num_labels - 1)
    if len(ds) and (low is None or low < allowed[0] or high > allowed[1]):
        raise DataConfigError(
            f"{where}: labels range {low}..{high}, outside {allowed[0]}..{allowed[1]} of task {task.name}"
        )
    return ds.cast(features(task)) if ds.features != features(task) else ds


def read_tsv(task: TaskInfo, path: Path) -> Dataset:
    """Parse a GLUE TSV strictly (no quoting, as GLUE's own readers): bad rows fail with file:line."""
    layout = TSV_LAYOUTS[task.name]
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    first = 0
    if layout.header:
        names = lines[0].rstrip("\r").split("\t") if lines else []
        needed = [*layout.columns.values(), layout.label]
        if missing := [c for c in needed if c not in names]:
            raise DataConfigError(f"{path}:1: header lacks column(s) {missing} for task {task.name}; found {names}")
        position = {c: names.index(c) for c in needed}
        num_columns, first = len(names), 1
    else:
        position = {c: c for c in [*layout.columns.values(), layout.label]}
        num_columns = layout.num_columns
    columns = {f: position[c] for f, c in layout.columns.items()}
    label_at, parse = position[layout.label], _label_parser(task, path)
    texts: dict[str, list[str]] = {f: [] for f in columns}
    labels: list[float | int] = []
    for lineno in range(first + 1, len(lines) + 1):
        parts = lines[lineno - 1].rstrip("\r").split("\t")
        if len(parts) != num_columns:
            raise DataConfigError(f"{path}:{lineno}: expected {num_columns} tab-separated columns, found {len(parts)}")
        for name, at in columns.items():
            texts[name].append(parts[at])
        labels.append(parse(parts[label_at], lineno))
    label_type = pa.float32() if task.is_regression else pa.int64()
    table = pa.table(
        {
            **{f: pa.array(v, pa.string()) for f, v in texts.items()},
            "label": pa.array(labels, label_type),
            "idx": pa.array(range(len(labels)), pa.int32()),
        }
    )
    return Dataset(table, info=DatasetInfo(features=features(task)))


def _label_parser(task: TaskInfo, path: Path) -> Callable[[str, int], float | int]:
    """GLUE writes labels as words (RTE, QNLI, MNLI), digits (CoLA, SST-2, MRPC, QQP) or scores (STS-B)."""
    if task.is_regression:
        low, high = STSB_RANGE

        def score(value: str, lineno: int) -> float:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not low <= number <= high:
                raise DataConfigError(f"{path}:{lineno}: label {value!r} is not a score in {low}..{high} ({task.name})")
            return number

        return score
    ids = {name: i for i, name in enumerate(task.label_names)} | {str(i): i for i in range(task.num_labels)}

    def label(value: str, lineno: int) -> int:
        try:
            return ids[value]
        except KeyError:
            raise DataConfigError(
                f"{path}:{lineno}: label {value!r} is not one of {list(task.label_names)} "
                f"or 0..{task.num_labels - 1} ({task.name})"
            ) from None

    return label


# ------------------------------------------------------------------------------ GLUE's unlabeled test sets
# The files GLUE's leaderboard scores, by split: MNLI has two, and its diagnostic set (AX) sits beside
# the tasks in download_glue_data.py's layout (`diagnostic/diagnostic.tsv`) or as the hub's `ax` config.
UNLABELED_TEST_FILES: dict[str, dict[str, str]] = {
    "mnli": {"test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"},
}
AX_FILES = ("diagnostic/diagnostic.tsv", "AX/AX.tsv", "ax/test.tsv", "diagnostic.tsv")
# CoLA's labelled files have no header; its test file has one ("index", "sentence").
_TEST_COLUMNS = {"cola": {"sentence": "sentence"}}


def unlabeled_test_splits(task: TaskInfo, data_dir: str | Path | None) -> dict[str, str]:
    """{split: leaderboard file name}: test (or test_matched/test_mismatched), plus AX for MNLI when present."""
    names = dict(zip(UNLABELED_TEST_FILES.get(task.name, {"test": "test.tsv"}), task.submission_files, strict=True))
    if task.name == "mnli" and (data_dir is None or _ax_file(data_dir) is not None):
        names["ax"] = "AX"
    return names


def _ax_file(data_dir: str | Path) -> Path | None:
    root = Path(data_dir).expanduser()
    for base in (root, root.parent):
        for name in AX_FILES:
            if (base / name).is_file():
                return base / name
        if found := _parquet_files(base / "ax", "test"):
            return found[0]
    return None


def unlabeled_test_files(task: TaskInfo, split: str, data_dir: str | Path) -> list[Path]:
    if split == "ax":
        found = _ax_file(data_dir)
        if found is None:
            raise DataConfigError(f"data_dir={str(data_dir)!r} has no GLUE diagnostic file ({', '.join(AX_FILES)})")
        return sorted(found.parent.glob("test-*.parquet")) if found.suffix == ".parquet" else [found]
    tsv_name = UNLABELED_TEST_FILES.get(task.name, {"test": "test.tsv"})[split]
    return _tsv_or_parquet(task_folder(task, data_dir), tsv_name, split, data_dir,
                           f"GLUE's unlabeled {split} split of {task.name}")  # fmt: skip


def load_unlabeled_test(task: TaskInfo, split: str, data_dir: str | Path | None) -> Dataset:
    """GLUE's unlabeled test split: the task's text fields and `idx` = GLUE's own row index."""
    fields = ("premise", "hypothesis") if split == "ax" else task.text_fields
    if data_dir is None:
        import datasets

        config = "ax" if split == "ax" else task.name
        try:
            ds = datasets.load_dataset(HUB_DATASET, config, split="test" if split == "ax" else split)
        except Exception as err:
            from datamodules.hub import DATA_HINT, unreachable

            if (hub := unreachable(f"{HUB_DATASET}/{config}", "--data.data_dir", DATA_HINT)) is not None:
                raise hub from None
            raise DataConfigError(
                f"data_dir=None: could not load {HUB_DATASET}/{config} ({split}) from the hub; pass --data.data_dir"
            ) from err
        table = ds.data.table
    else:
        files = unlabeled_test_files(task, split, data_dir)
        if files[0].suffix == ".parquet":
            table = pa.concat_tables([pq.read_table(f) for f in files])
        else:
            table = _read_test_tsv(task, files[0], fields, split)
    where = f"{task.name} {split}"
    index = "idx" if "idx" in table.column_names else None
    if missing := [f for f in fields if f not in table.column_names]:
        raise DataConfigError(f"{where}: columns {missing} missing; found {table.column_names}")
    ids = table.column(index).to_pylist() if index else list(range(table.num_rows))
    return Dataset(
        pa.table({**{f: pc.cast(table.column(f), pa.string()) for f in fields}, "idx": pa.array(ids, pa.int64())})
    )


def _read_test_tsv(task: TaskInfo, path: Path, fields: tuple[str, ...], split: str) -> pa.Table:
    """GLUE's test TSVs have a header; their index column is `index` (QQP: `id`)."""
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataConfigError(f"{path}: the file is empty")
    names = lines[0].rstrip("\r").split("\t")
    if split == "ax":
        columns = {"premise": "sentence1", "hypothesis": "sentence2"}
    else:
        columns = _TEST_COLUMNS.get(task.name, TSV_LAYOUTS[task.name].columns)  # type: ignore[arg-type]
    index = next((c for c in ("index", "id") if c in names), None)
    needed = [*columns.values(), *([index] if index else [])]
    if missing := [c for c in needed if c not in names]:
        raise DataConfigError(f"{path}:1: header lacks column(s) {missing} for {task.name} {split}; found {names}")
    at = {c: names.index(str(c)) for c in needed}
    values: dict[str, list[str]] = {c: [] for c in needed}
    for lineno in range(2, len(lines) + 1):
        parts = lines[lineno - 1].rstrip("\r").split("\t")
        if len(parts) != len(names):
            raise DataConfigError(f"{path}:{lineno}: expected {len(names)} tab-separated columns, found {len(parts)}")
        for c in needed:
            values[str(c)].append(parts[at[c]])
    out: dict[str, pa.Array] = {f: pa.array(values[str(columns[f])], pa.string()) for f in fields}
    try:
        out["idx"] = pa.array([int(v) for v in values[index]] if index else range(len(lines) - 1), pa.int64())
    except ValueError:
        raise DataConfigError(f"{path}: the {index!r} column holds a value that is not an integer") from None
    return pa.table(out)
