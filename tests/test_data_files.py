"""Your own data: every file format gives the same rows, labels come from the data, bad files say what is wrong."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_helpers import write_tokenizer

from datamodules import DataConfigError, TextDataModule
from datamodules.splits import few_shot_split

WORDS = "the a cat dog man woman house car tree river good bad is not very old new runs sees".split()


def rows(n: int = 30, regression: bool = False, pair: bool = False, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        row = {"review": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))}
        if pair:
            row["hypothesis"] = " ".join(rng.choice(WORDS) for _ in range(3))
        row["sentiment"] = round(rng.uniform(0, 5), 2) if regression else ["pos", "neg", "meh"][i % 3]
        out.append(row)
    return out


def write(path: Path, data: list[dict]) -> str:
    """The same rows in the format the extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(data), path)
    else:
        with open(path, "w", newline="") as f:
            delimiter = "\t" if suffix == ".tsv" else ","
            writer = csv.DictWriter(f, fieldnames=list(data[0]), delimiter=delimiter, lineterminator="\n")
            writer.writeheader()
            writer.writerows(data)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def module(tokenizer: str, tmp_path: Path, **kwargs) -> TextDataModule:
    kwargs.setdefault("label_field", "sentiment")
    kwargs.setdefault("dev_size", 5)
    return TextDataModule(model_name_or_path=tokenizer, cache_dir=str(tmp_path / "cache"), **kwargs)


def loaded(dm: TextDataModule) -> TextDataModule:
    dm.stage = "fit"
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("kind", ["classification", "regression", "pair"])
def test_every_format_gives_the_same_task_and_rows(tokenizer, tmp_path, suffix, kind):
    data = rows(30, regression=kind == "regression", pair=kind == "pair")
    fields = ["review", "hypothesis"] if kind == "pair" else ["review"]
    train = write(tmp_path / f"reviews{suffix}", data)
    dm = loaded(module(tokenizer, tmp_path, train_file=train, text_fields=fields, k_shot=12, dev_size=8))
    task = dm.task_info
    assert task.name == "reviews" and task.text_fields == tuple(fields) and not task.is_glue
    if kind == "regression":  # float labels: one output, scored with Pearson and Spearman
        assert task.is_regression and task.num_labels == 1 and task.metrics == ("pearson", "spearman")
    else:  # labels sorted: a stable order whatever the row order
        assert task.label_names == ("meh", "neg", "pos") and task.metrics == ("accuracy", "f1_macro")
        assert task.main_metric == "f1_macro"
    # The GLUE protocol: shuffle by seed, first K train, next dev_size dev; test = the dev rows (no test file).
    ids = {"meh": 0, "neg": 1, "pos": 2}
    labels = [r["sentiment"] if kind == "regression" else ids[r["sentiment"]] for r in data]
    import datasets

    reference = datasets.Dataset.from_dict({"label": labels, "idx": list(range(30))})
    train_ref, dev_ref = few_shot_split(reference, 12, 0, 8)
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["validation"]) == 8
    got = dm.datasets["train"]["labels"]
    assert got == pytest.approx(train_ref["label"]) if kind == "regression" else got == train_ref["label"]
    assert len(dm.datasets["test"]) == 8 and dm.test_is_validation
    # The text reaches the tokenizer: the first train row's tokens are those of its own text.
    first = data[train_ref["idx"][0]]
    expected = dm.tokenizer(*(first[f] for f in fields))["input_ids"]
    assert dm.datasets["train"]["input_ids"][0] == expected


def test_labels_given_set_the_order_and_ints_work(tokenizer, tmp_path):
    data = [{"text": f"{w} a", "label": i % 2} for i, w in enumerate(WORDS)]
    train = write(tmp_path / "ints.csv", data)
    dm = module(tokenizer, tmp_path, train_file=train, label_field="label", dev_size=5)
    assert dm.task_info.label_names == ("0", "1") and dm.task_info.text_fields == ("text",)
    named = module(tokenizer, tmp_path, train_file=train, label_field="label", dev_size=5, labels=["no", "yes"])
    assert named.task_info.label_names == ("no", "yes")  # ids 0/1 index the given names
    loaded(named)
    assert sorted(set(named.datasets["train"]["labels"])) == [0, 1]


def test_validation_and_test_files_are_used(tokenizer, tmp_path):
    train = write(tmp_path / "train.csv", rows(20))
    dev = write(tmp_path / "dev.jsonl", rows(7, seed=1))
    test = write(tmp_path / "test.tsv", rows(9, seed=2))
    dm = loaded(module(tokenizer, tmp_path, train_file=train, validation_file=dev, test_file=test,
                       text_fields=["review"]))  # fmt: skip
    assert [len(dm.datasets[s]) for s in ("train", "validation", "test")] == [20, 7, 9]
    assert not dm.test_is_validation


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_bad_files_name_the_file_and_the_problem(tokenizer, tmp_path):
    good = rows(20)
    train = write(tmp_path / "good.csv", good)
    cases = {}
    (tmp_path / "empty.csv").write_text("")
    cases["empty"] = (dict(train_file=str(tmp_path / "empty.csv")), ["empty.csv", "empty"])
    cases["missing column"] = (
        dict(train_file=train, text_fields=["body"]),
        ["good.csv", "'body'", "columns: ['review', 'sentiment']"],
    )
    cases["missing label column"] = (
        dict(train_file=train, text_fields=["review"], label_field="stars"),
        ["good.csv", "'stars'", "--data.label_field", "'review'"],
    )
    cases["label outside labels"] = (
        dict(train_file=train, text_fields=["review"], labels=["pos", "neg"]),
        ["good.csv:4", "'meh'", "['pos', 'neg']", "--data.labels"],
    )
    (tmp_path / "ragged.csv").write_text("review,sentiment\na cat,pos\na dog,neg,extra\n")
    cases["ragged row"] = (dict(train_file=str(tmp_path / "ragged.csv")), ["ragged.csv:3", "expected 2", "found 3"])
    (tmp_path / "broken.jsonl").write_text('{"review": "a", "sentiment": "pos"}\n{"review": "b", sentiment}\n')
    cases["bad json"] = (dict(train_file=str(tmp_path / "broken.jsonl")), ["broken.jsonl:2", "not valid JSON"])
    (tmp_path / "header.csv").write_text("review,sentiment\n")
    cases["no rows"] = (dict(train_file=str(tmp_path / "header.csv")), ["header.csv", "no data rows"])
    (tmp_path / "data.xlsx").write_text("x")
    cases["unknown type"] = (dict(train_file=str(tmp_path / "data.xlsx")), ["data.xlsx", ".csv, .tsv, .jsonl"])
    cases["missing file"] = (dict(train_file=str(tmp_path / "nope.csv")), ["nope.csv", "no such file"])
    dev = write(tmp_path / "dev.csv", [{"review": "a", "sentiment": "great"}])
    cases["dev label"] = (
        dict(train_file=train, validation_file=dev, text_fields=["review"]),
        ["dev.csv:2", "'great'", "['meh', 'neg', 'pos']"],
    )
    cases["one class"] = (
        dict(train_file=write(tmp_path / "one.csv", [{"review": "a", "sentiment": "pos"}] * 9), dev_size=2),
        ["one.csv", "one label"],
    )
    cases["too few rows"] = (dict(train_file=train, text_fields=["review"], dev_size=50), ["dev_size=50", "20 rows"])
    for name, (kwargs, expected) in cases.items():
        with pytest.raises(DataConfigError) as exc:
            loaded(module(tokenizer, tmp_path, **kwargs))
        text = one_line(exc)
        assert all(e in text for e in expected), (name, text)
