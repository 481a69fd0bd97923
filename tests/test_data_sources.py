"""Raw splits from GLUE TSVs, the hub's parquet export and the hub itself: same rows, same labels."""

from __future__ import annotations

import datasets
import pytest
from datasets import Dataset
from test_data_helpers import write_all, write_task

from datamodules import GLUE_TASKS, DataConfigError, get_task
from datamodules.sources import features, load_raw_split, raw_splits


@pytest.fixture(scope="module")
def glue(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("glue")
    return root, write_all(root)


def _same_rows(ds: Dataset, rows: list[dict]) -> None:
    assert len(ds) == len(rows)
    for got, want in zip(ds, rows, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), key


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_tsv_fields_and_labels(glue, task: str) -> None:
    root, expected = glue
    info = get_task(task)
    assert raw_splits(info) == tuple(expected[task])
    for split, rows in expected[task].items():
        ds = load_raw_split(info, split, root)
        assert ds.column_names == [*info.text_fields, "label", "idx"]
        assert ds.features == features(info)
        _same_rows(ds, rows)


def test_header_quirks(glue) -> None:
    root, _ = glue
    assert (root / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert not (root / "CoLA" / "dev.tsv").read_text().endswith("\n")
    first = load_raw_split(get_task("mrpc"), "train", root)[0]
    assert first["sentence1"].startswith('He said " the witness "')
    assert load_raw_split(get_task("cola"), "validation", root)[-1]["idx"] == 11


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_parquet_export_and_hub_give_identical_data(glue, tmp_path, monkeypatch, task: str) -> None:
    """The hub's layout: `<config>/<split>-00000-of-00001.parquet`, columns in the hub's order."""
    root, _ = glue
    info = get_task(task)
    hub = {}
    for split in raw_splits(info):
        ds = load_raw_split(info, split, root)
        hub[split] = ds.select_columns(["idx", "label", *info.text_fields])  # order differs on purpose
        (tmp_path / task).mkdir(exist_ok=True)
        hub[split].to_parquet(tmp_path / task / f"{split}-00000-of-00001.parquet")
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: hub[split])
    for split in raw_splits(info):
        tsv = load_raw_split(info, split, root)
        for other in (load_raw_split(info, split, tmp_path), load_raw_split(info, split, None)):
            assert other.features == tsv.features
            assert other.to_dict() == tsv.to_dict()


def test_task_folder_itself_is_accepted(glue) -> None:
    root, expected = glue
    ds = load_raw_split(get_task("sst2"), "train", root / "SST-2")
    assert len(ds) == len(expected["sst2"]["train"])
    with pytest.raises(DataConfigError, match="no SST-2/ folder"):
        load_raw_split(get_task("sst2"), "train", root / "RTE")


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_data_dir_and_files(tmp_path) -> None:
    with pytest.raises(DataConfigError, match="data_dir=") as err:
        load_raw_split(get_task("rte"), "train", tmp_path / "nope")
    _one_line(err)
    with pytest.raises(DataConfigError, match="no RTE/ folder") as err:
        load_raw_split(get_task("rte"), "train", tmp_path)
    write_task(tmp_path, "rte")
    (tmp_path / "RTE" / "dev.tsv").unlink()
    with pytest.raises(DataConfigError, match=r"RTE/dev\.tsv") as err:
        load_raw_split(get_task("rte"), "validation", tmp_path)
    _one_line(err)


@pytest.mark.parametrize(
    ("task", "line", "bad", "match"),
    [
        ("rte", 3, "2\tonly two columns", r"RTE/train\.tsv:3: expected 4 tab-separated columns, found 2"),
        ("rte", 4, "3\ta\tb\tcontradiction", r"RTE/train\.tsv:4: label 'contradiction'"),
        ("sst2", 2, "a film \t2", r"SST-2/train\.tsv:2: label '2'"),
        ("cola", 1, "gj04\tyes\t\ta sentence", r"CoLA/train\.tsv:1: label 'yes'"),
        ("stsb", 5, "4\tg\tf\ty\to\ts\ts\ta\tb\t5.5", r"STS-B/train\.tsv:5: label '5.5'"),
        ("mnli", 2, "\t".join(["x"] * 11) + "\tmaybe", r"MNLI/train\.tsv:2: label 'maybe'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, task: str, line: int, bad: str, match: str) -> None:
    write_task(tmp_path, task)
    path = tmp_path / get_task(task).glue_dir / "train.tsv"
    lines = path.read_text("utf-8").split("\n")
    lines[line - 1] = bad
    path.write_text("\n".join(lines), "utf-8")
    with pytest.raises(DataConfigError, match=match) as err:
        load_raw_split(get_task(task), "train", tmp_path)
    _one_line(err)


def test_header_without_the_tasks_columns(tmp_path) -> None:
    write_task(tmp_path, "qnli")
    path = tmp_path / "QNLI" / "dev.tsv"
    path.write_text(path.read_text().replace("question\t", "query\t", 1))
    with pytest.raises(DataConfigError, match=r"QNLI/dev\.tsv:1: header lacks column\(s\) \['question'\]"):
        load_raw_split(get_task("qnli"), "validation", tmp_path)


def test_parquet_labels_outside_the_task(tmp_path) -> None:
    (tmp_path / "rte").mkdir()
    Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [-1], "idx": [0]}).to_parquet(
        tmp_path / "rte" / "train-00000-of-00001.parquet"
    )
    with pytest.raises(DataConfigError, match=r"labels range -1\.\.-1, outside 0\.\.1 of task rte"):
        load_raw_split(get_task("rte"), "train", tmp_path)


def test_hub_unreachable_says_to_pass_data_dir(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataConfigError, match="data_dir=None: could not load nyu-mll/glue/rte") as err:
        load_raw_split(get_task("rte"), "train")
    assert "pass data_dir=" in _one_line(err)
