"""Pinned outputs of the data modules: the rows each split holds and the batches each loader yields.

The fixture ``tests/fixtures/data_v1_outputs.json`` was written by the data modules before the v3
refactor (TextDataModule as a subclass of GLUEDataModule). For GLUE tasks read from local files,
for your own CSV/JSON Lines/TSV files and for instruction data, with tiny tokenizers, it holds per
case: the data module's hyperparameters (what checkpoints record), the task, every tokenised split
(K-shot train and dev for two split seeds, test, rows to predict), every batch of the train loader
(seeded), the validation, test and predict loaders, and the cache folders' names. Today's code must
give exactly the same.

Regenerate only from code known to be right: ``python tests/test_data_pinned.py``.
"""

from __future__ import annotations

import csv
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decoder_fixtures import prompt_rows, tiny_tokenizer, write_jsonl  # noqa: E402
from test_data_helpers import write_task, write_tokenizer  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "data_v1_outputs.json"
TRAIN_SEED = 1234  # the training seed: the train loader's order
WORDS = "the a cat dog man woman house car tree river good bad is not very old new runs sees".split()


# ------------------------------------------------------------------------------------------- files
def write_glue(root: Path) -> Path:
    """RTE, STS-B and MNLI in GLUE's layout, with their unlabeled test files and MNLI's diagnostic set."""
    glue = root / "glue"
    for task in ("rte", "stsb", "mnli"):
        write_task(glue, task)
    rng = random.Random(5)
    for name, n in (("RTE/test.tsv", 6), ("MNLI/test_matched.tsv", 5), ("MNLI/test_mismatched.tsv", 4),
                    ("diagnostic/diagnostic.tsv", 3)):  # fmt: skip
        (glue / name).parent.mkdir(parents=True, exist_ok=True)
        lines = ["index\tsentence1\tsentence2", *(f"{i}\t{text(rng)}\t{text(rng)}" for i in range(n))]
        (glue / name).write_text("\n".join(lines) + "\n")
    return glue


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))


def write_table(path: Path, n: int, seed: int, labelled: bool = True, regression: bool = False) -> str:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"id": i, "review": text(rng)}
        if labelled:
            row["sentiment"] = round(rng.uniform(0, 5), 2) if regression else rng.choice(["neg", "pos", "meh"])
        rows.append(row)
    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


# ---------------------------------------------------------------------------------------- snapshots
def plain(value: Any, root: Path) -> Any:
    """JSON-able, with the temporary folder's path replaced by `<root>`."""
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype), "values": value.tolist()}
    if isinstance(value, dict):
        return {str(k): plain(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "<root>")
    return value


def loader_batches(loader: Any) -> list[list[dict]]:
    loaders = loader if isinstance(loader, list) else [loader]
    return [list(one) for one in loaders]


def snapshot(dm: Any, root: Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """Per stage (as the CLI drives it: stage, prepare_data, setup): the splits and every loader's batches."""
    out: dict[str, Any] = {"hparams": dict(dm.hparams)}
    if hasattr(dm, "task_info"):
        out["task"] = dm.task_info.to_dict()
    for stage in stages:
        dm.stage = stage
        dm.prepare_data()
        dm.setup(stage)
        if stage == "fit":
            torch.manual_seed(TRAIN_SEED)
            out["train"] = loader_batches(dm.train_dataloader())
            out["validation"] = loader_batches(dm.val_dataloader())
        elif stage == "test":
            out["test"] = loader_batches(dm.test_dataloader())
        elif stage == "predict":
            out["predict"] = loader_batches(dm.predict_dataloader())
            if hasattr(dm, "predict_splits"):
                out["predict_splits"] = dm.predict_splits
    out["datasets"] = {name: data.to_dict() for name, data in sorted(dm.datasets.items())}
    for name in ("test_is_validation",):
        if hasattr(dm, name):
            out[name] = getattr(dm, name)
    cache = Path(dm.cache_dir)
    out["cache"] = sorted(str(p.relative_to(cache)).rsplit("-", 1)[0] for p in cache.glob("**/*-*") if p.is_dir()
                          and (p / "dataset_info.json").is_file())  # fmt: skip
    return plain(out, root)


def text_cases(root: Path) -> dict[str, Any]:
    from datamodules import GLUEDataModule, TextDataModule

    glue, tok = write_glue(root), write_tokenizer(root / "tok")
    table = {
        "train": write_table(root / "reviews.csv", 30, 0),
        "dev": write_table(root / "dev.jsonl", 7, 1),
        "test": write_table(root / "test.tsv", 6, 2),
        "scores": write_table(root / "scores.csv", 25, 3, regression=True),
        "new": write_table(root / "new.csv", 9, 4, labelled=False),
    }
    mine = {"text_fields": ["review"], "label_field": "sentiment"}

    def text_dm(case: str, **kwargs: Any) -> TextDataModule:
        sizes = {"batch_size": 4, "eval_batch_size": 5}
        return TextDataModule(model_name_or_path=tok, cache_dir=str(root / "cache" / case), **sizes, **kwargs)

    everything = ("fit", "test", "predict")
    cases: dict[str, tuple[Any, tuple[str, ...]]] = {
        "rte_k8_seed0": (text_dm("rte_k8_seed0", task="rte", data_dir=str(glue), k_shot=8, dev_size=10), everything),
        "rte_k8_seed3": (text_dm("rte_k8_seed3", task="RTE", data_dir=str(glue), k_shot=8, dev_size=10, seed=3),
                         ("fit", "test")),
        "rte_full": (text_dm("rte_full", task="rte", data_dir=str(glue), max_seq_length=12), ("fit", "test")),
        "stsb_k8": (text_dm("stsb_k8", task="stsb", data_dir=str(glue), k_shot=8, dev_size=6, seed=1),
                    ("fit", "test")),
        "mnli_k8": (text_dm("mnli_k8", task="mnli", data_dir=str(glue), k_shot=8, dev_size=5), everything),
        "mnli_predict_only": (text_dm("mnli_predict_only", task="mnli", data_dir=str(glue)), ("predict",)),
        "csv_k6_seed0": (text_dm("csv_k6_seed0", train_file=table["train"], k_shot=6, dev_size=5,
                                 predict_file=table["new"], **mine), everything),
        "csv_k6_seed3": (text_dm("csv_k6_seed3", train_file=table["train"], k_shot=6, dev_size=5, seed=3, **mine),
                         ("fit", "test")),
        "csv_rest": (text_dm("csv_rest", train_file=table["train"], dev_size=8, name="mine", **mine),
                     ("fit", "test")),
        "csv_files": (text_dm("csv_files", train_file=table["train"], validation_file=table["dev"],
                              test_file=table["test"], k_shot=10, labels=["pos", "neg", "meh"], **mine),
                      ("fit", "test")),
        "csv_regression": (text_dm("csv_regression", train_file=table["scores"], k_shot=9, dev_size=7, seed=2,
                                   **mine), ("fit", "test")),
        "csv_predict_from_checkpoint": (text_dm("csv_predict_from_checkpoint", predict_file=table["new"],
                                                labels=["meh", "neg", "pos"], name="reviews", **mine), ("predict",)),
        "glue_module_rte_k8": (GLUEDataModule("rte", tok, data_dir=str(glue), k_shot=8, dev_size=10, batch_size=4,
                                              eval_batch_size=5, cache_dir=str(root / "cache" / "glue_module")),
                               ("fit", "test")),
    }
    return {name: snapshot(dm, root, stages) for name, (dm, stages) in cases.items()}


def instruct_cases(root: Path) -> dict[str, Any]:
    from datamodules.instruct import InstructionDataModule

    rows = prompt_rows(30, seed=2)
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in prompt_rows(12, seed=4)]
    files = {
        "train": str(write_jsonl(root / "train.jsonl", rows)),
        "test": str(write_jsonl(root / "test.jsonl", prompt_rows(7, seed=3))),
        "chat": str(write_jsonl(root / "chat.jsonl", chat)),
        "predict": str(write_jsonl(root / "predict.jsonl", prompt_rows(6, seed=5) + chat[:3])),
    }

    def make(case: str, **kwargs: Any) -> InstructionDataModule:
        dm = InstructionDataModule("unused", cache_dir=str(root / "cache" / case), batch_size=4, eval_batch_size=3,
                                   bucket_batches=2, **kwargs)
        dm.tokenizer = tiny_tokenizer()
        return dm

    everything = ("fit", "test", "predict")
    cases = {
        "instruct_k10_seed0": (make("k10s0", train_file=files["train"], test_file=files["test"], k_shot=10,
                                    dev_size=5, predict_file=files["predict"]), everything),
        "instruct_k10_seed3": (make("k10s3", train_file=files["train"], k_shot=10, dev_size=5, seed=3), ("fit",)),
        "instruct_rest": (make("rest", train_file=files["train"], dev_size=6, max_seq_length=10), ("fit",)),
        "instruct_chat_files": (make("chat", train_file=files["chat"], validation_file=files["test"],
                                     use_chat_template=True), ("fit",)),
    }
    return {name: snapshot(dm, root, stages) for name, (dm, stages) in cases.items()}


def all_cases(root: Path) -> dict[str, Any]:
    return {**text_cases(root), **instruct_cases(root)}


# -------------------------------------------------------------------------------------------- tests
def first_difference(got: Any, want: Any, path: str = "") -> str | None:
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return f"{path}: keys {sorted(set(got) ^ set(want))} differ"
        return next((d for k in want if (d := first_difference(got[k], want[k], f"{path}.{k}"))), None)
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return f"{path}: {len(got)} items, pinned {len(want)}"
        return next((d for i, (g, w) in enumerate(zip(got, want, strict=True))
                     if (d := first_difference(g, w, f"{path}[{i}]"))), None)  # fmt: skip
    return None if got == want and type(got) is type(want) else f"{path}: {got!r}, pinned {want!r}"


@pytest.fixture(scope="module")
def pinned() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def today(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pinned")
    return json.loads(json.dumps(all_cases(root)))  # the same JSON round trip the fixture went through


def test_every_case_is_pinned(pinned, today) -> None:
    assert sorted(today) == sorted(pinned)


# v3 made GLUEDataModule a factory of TextDataModule(task=...): what it gained, exactly; the rest is unchanged.
FILE_OPTIONS_UNSET = {"train_file": None, "validation_file": None, "test_file": None, "predict_file": None,
                      "text_fields": None, "label_field": "label", "labels": None, "regression": None, "name": None}
GAINED_IN_V3 = {"glue_module_rte_k8": {"test_is_validation": False, "hparams": FILE_OPTIONS_UNSET}}


@pytest.mark.parametrize("case", sorted(json.loads(FIXTURE.read_text())) if FIXTURE.is_file() else [])
def test_outputs_equal_the_pinned_ones(pinned, today, case) -> None:
    got = json.loads(json.dumps(today[case]))
    for key, gained in GAINED_IN_V3.get(case, {}).items():
        if isinstance(gained, dict):
            assert {k: got[key].pop(k) for k in gained} == gained
        else:
            assert got.pop(key) == gained
    assert first_difference(got, pinned[case], case) is None


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        outputs = all_cases(Path(folder).resolve())
    FIXTURE.write_text(json.dumps(outputs, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1024:.0f} KiB, {len(outputs)} cases)")
