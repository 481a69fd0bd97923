"""InstructionDataModule: prompt/response or chat data for causal LMs, loss on the response tokens only.

Rows come from JSON Lines, a JSON array, CSV or a hub dataset. A row is either
``{"prompt": ..., "response": ...}`` (plain text; ``use_chat_template`` wraps it as one user turn)
or ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the tokenizer's chat
template, the loss on every assistant turn.

Tokenisation is segment-wise: the prompt is tokenised alone and the response's tokens appended
(then EOS), so the tokens trained on follow exactly the tokens ``generate`` sees at prediction
(a prompt tokenised alone). Labels are -100 on every non-response token.

Few-shot protocol as GLUE (``datamodules.splits.few_shot_split``): the train file shuffled by
``seed``, the first ``k_shot`` rows train, the next ``dev_size`` rows dev. Without ``k_shot`` the
dev split is ``validation_file``, or else ``dev_size`` rows held out of train the same way.

Training batches are bucketed: each epoch's seeded permutation is cut into groups of
``bucket_batches`` batches and each group sorted by length, so a batch holds rows of similar
length (see ``padding_share``). Evaluation runs longest rows first; prediction pads on the left
(what ``generate`` needs).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler

from datamodules.cache import cache_key, default_cache_dir, file_identity, load_or_build, tokenizer_identity
from datamodules.errors import DataConfigError, check_integers, first_line
from datamodules.files import file_format, read_jsonl_rows, read_table
from datamodules.hub import DECODER_HINT, INSTRUCTION_DATA_HINT, load_tokenizer, prepare_for, unreachable
from datamodules.resumable import ResumableDataLoader
from datamodules.samplers import (
    EpochSeededRandomSampler,
    OrderedEvalSampler,
    data_loader,
    eval_sampler,
    longest_first,
)
from datamodules.splits import few_shot_split, train_size

IGNORE_INDEX = -100  # what Hugging Face's cross-entropy skips
FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # what files.read_table reads, and JSON arrays
ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------------------- reading
def read_rows(path: str | Path, option: str = "file") -> list[dict[str, Any]]:
    """Rows of a file, one dict each: what `datamodules.files` reads (CSV, TSV, JSON Lines, parquet; a bad
    row is one DataConfigError naming file:line), plus a ``.json`` file holding one JSON array of objects."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
            if not all(isinstance(r, dict) for r in rows):
                raise DataConfigError(f"{path}: a JSON array of objects is expected")
            return rows
    if file_format(str(path)) == "jsonl" and path.is_file():  # rows as written: chat and prompt rows may mix
        return read_jsonl_rows(path, str(path))[0]
    table = read_table(str(path), option)
    names = list(table.columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*table.columns.values(), strict=True)]


def _where(path: str, i: int) -> str:
    return f"{path} row {i + 1}"


# -------------------------------------------------------------------------------------- rendering
class Renderer:
    """Turns one row into token segments ``[(ids, trained), ...]`` (training) or prompt ids (prediction)."""

    def __init__(self, tokenizer: Any, prompt_field: str, response_field: str, messages_field: str,
                 use_chat_template: bool) -> None:
        self.tokenizer = tokenizer
        self.prompt_field, self.response_field, self.messages_field = prompt_field, response_field, messages_field
        self.use_chat_template = use_chat_template
        if tokenizer.eos_token_id is None:
            raise DataConfigError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token: a response cannot end")

    def _messages(self, row: dict[str, Any], where: str, need_answer: bool) -> list[dict[str, str]] | None:
        if self.messages_field in row and row[self.messages_field] is not None:
            messages = row[self.messages_field]
            if isinstance(messages, str):  # CSV cells hold JSON text
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError:
                    raise DataConfigError(f"{where}: {self.messages_field!r} is not a JSON list of messages") from None
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES
                for m in messages
            ):
                raise DataConfigError(
                    f"{where}: {self.messages_field!r} must be a non-empty list of "
                    f"{{'role': one of {list(ROLES)}, 'content': text}}"
                )
            if need_answer and not any(m["role"] == "assistant" for m in messages):
                raise DataConfigError(f"{where}: {self.messages_field!r} has no assistant turn to train on")
            return [{"role": m["role"], "content": m["content"]} for m in messages]
        prompt = row.get(self.prompt_field)
        if not isinstance(prompt, str):
            raise DataConfigError(
                f"{where}: needs a text {self.prompt_field!r} field (found {sorted(row)}) or {self.messages_field!r}"
            )
        response = row.get(self.response_field)
        if need_answer and not isinstance(response, str):
            raise DataConfigError(f"{where}: needs a text {self.response_field!r} field (found {sorted(row)})")
        if not self.use_chat_template:
            return None
        turns = [{"role": "user", "content": prompt}]
        return turns + [{"role": "assistant", "content": response}] if isinstance(response, str) else turns

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataConfigError(f"{where}: chat messages need a tokenizer with a chat template; this one has none")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def segments(self, row: dict[str, Any], where: str) -> list[tuple[list[int], bool]]:
        messages = self._messages(row, where, need_answer=True)
        if messages is None:
            prompt, response = row[self.prompt_field], row[self.response_field]
            return [(self._ids(prompt, True), False),
                    (self._ids(response, False) + [self.tokenizer.eos_token_id], True)]
        # Each assistant turn: the text the template adds for it, after the generation prompt of
        # the turns before. The template must render conversations incrementally for this to hold.
        segments, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._template(messages[:i], True, where)
            upto = self._template(messages[: i + 1], False, where)
            if not (before.startswith(done) and upto.startswith(before)):
                raise DataConfigError(
                    f"{where}: the chat template does not render this conversation turn by turn "
                    f"(turn {i + 1} changes the text before it); split it into single-answer conversations"
                )
            segments += [(self._ids(before[len(done):], False), False), (self._ids(upto[len(before):], False), True)]
            done = upto
        return segments

    def prompt_ids(self, row: dict[str, Any], where: str) -> list[int]:
        """What generation starts from: the prompt, or the conversation up to its last assistant answer."""
        messages = self._messages(row, where, need_answer=False)
        if messages is None:
            return self._ids(row[self.prompt_field], True)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the reference answer stays in the output row, not the prompt
        return self._ids(self._template(messages, True, where), False)


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut the end; when that would leave no response token, keep the last ``max_length`` tokens instead."""
    if len(ids) <= max_length:
        return ids, labels
    if any(label != IGNORE_INDEX for label in labels[:max_length]):
        return ids[:max_length], labels[:max_length]
    return ids[-max_length:], labels[-max_length:]


# ---------------------------------------------------------------------------------------- batching
class CausalCollate:
    """Pads input_ids (pad id), attention_mask (0) and labels (-100) to the batch's longest row.

    Right padding for training and evaluation; left padding for generation. Extra integer
    columns (``row``) become tensors.
    """

    def __init__(self, pad_id: int, left: bool = False) -> None:
        self.pad_id, self.left = pad_id, left

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        fills = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch: dict[str, list] = {k: [] for k in rows[0] if k in fills}
        batch["attention_mask"] = []
        for r in rows:
            n = width - len(r["input_ids"])
            row = {**r, "attention_mask": [1] * len(r["input_ids"])}
            for key in batch:
                pad = [fills[key]] * n
                batch[key].append(pad + list(row[key]) if self.left else list(row[key]) + pad)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        for key in rows[0]:
            if key not in fills:
                out[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return out


class BucketedRandomSampler(EpochSeededRandomSampler):
    """Batches of rows of similar length, in a random order that is a pure function of (seed, epoch).

    The epoch's seeded permutation (the parent's) is cut into groups of ``batch_size *
    bucket_batches`` rows; each group is sorted by length (a stable sort, so rows of equal
    length stay in random order, as fairseq does) and cut into batches; the batches are then
    shuffled, the longest kept first (an out-of-memory shows at the first step, as in
    transformers' LengthGroupedSampler). A resumed epoch (``start``) skips into this order.
    Under DDP Lightning swaps it for its DistributedSampler (no bucketing there), as for the parent.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, bucket_batches: int, seed: int = 0) -> None:
        super().__init__(lengths, seed=seed)
        self.lengths, self.batch_size = list(lengths), batch_size
        self.group = batch_size * bucket_batches

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        order = list(super().__iter__())
        batches = []
        for g in range(0, len(order), self.group):
            rows = sorted(order[g:g + self.group], key=lambda i: -self.lengths[i])
            batches += [rows[b:b + self.batch_size] for b in range(0, len(rows), self.batch_size)]
        # The DataLoader re-cuts this flat order every batch_size rows, so the one short batch
        # (the end of the last group) must stay last.
        full = [b for b in batches if len(b) == self.batch_size]
        short = batches[len(full):]
        rng = np.random.default_rng([self.seed, self.epoch, 1])  # not the permutation's own stream
        full = [full[b] for b in rng.permutation(len(full)).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda b: self.lengths[full[b][0]])
            full.insert(0, full.pop(longest))
        yield from [i for batch in full + short for i in batch][start:]


def padding_share(loader: DataLoader) -> float:
    """Share of the tokens in a loader's batches that are padding (0 = none)."""
    pad = total = 0
    for batch in loader:
        mask = batch["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / max(1, total)


# ----------------------------------------------------------------------------------- data module
class InstructionDataModule(pl.LightningDataModule):
    """Instruction tuning data for a causal LM: the GLUE few-shot protocol, response-only loss.

    Args:
        model_name_or_path: the backbone whose tokenizer (and chat template) is used.
        gguf_file: a GGUF file in that folder to read the tokenizer from (``from_pretrained(gguf_file=)``).
        train_file / validation_file / test_file / predict_file: ``.jsonl``, ``.json`` (lines or an array),
            ``.csv``, ``.tsv`` or ``.parquet``.
        dataset / dataset_config: a hub dataset (``datasets.load_dataset``) instead of files;
            splits by ``train_split`` / ``validation_split`` / ``test_split`` names.
        prompt_field / response_field / messages_field: column names.
        use_chat_template: render prompt/response rows as one user turn + one assistant turn.
        k_shot, seed, dev_size: the few-shot split (see the module docstring).
        max_seq_length: longest training/evaluation row (see ``truncate``); prompts for
            prediction keep their last ``max_seq_length`` tokens.
        bucket_batches: how many batches' rows are sorted by length together (1: none); the
            default sorts up to 64 batches' rows at once (a K=100 split all at once).
    """

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-0.5B",
        gguf_file: str | None = None,
        train_file: str | None = None, validation_file: str | None = None, test_file: str | None = None,
        predict_file: str | None = None,
        dataset: str | None = None, dataset_config: str | None = None,
        train_split: str = "train", validation_split: str | None = None, test_split: str | None = None,
        prompt_field: str = "prompt", response_field: str = "response", messages_field: str = "messages",
        use_chat_template: bool = False,
        k_shot: int | None = None, seed: int = 0, dev_size: int = 100,
        max_seq_length: int = 512,
        batch_size: int = 8, eval_batch_size: int = 16, bucket_batches: int = 64,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_integers(k_shot=(k_shot, 1), seed=(seed, 0), dev_size=(dev_size, 1), max_seq_length=(max_seq_length, 8),
                       batch_size=(batch_size, 1), eval_batch_size=(eval_batch_size, 1),
                       bucket_batches=(bucket_batches, 1), num_workers=(num_workers, 0))  # fmt: skip
        if dataset is not None and any((train_file, validation_file, test_file)):
            raise DataConfigError(f"dataset={dataset!r}: give either a hub dataset or train/validation/test files")
        if k_shot is not None and (validation_file or validation_split):
            raise DataConfigError(
                f"k_shot={k_shot}: the few-shot dev split comes from train (GLUE protocol); drop validation_file"
            )
        for name in ("train_file", "validation_file", "test_file", "predict_file"):
            path = getattr(self.hparams, name)
            if path is not None:  # fail before training starts
                if file_format(path) is None:
                    raise DataConfigError(f"{name}={path!r}: unknown file type; use one of {', '.join(FORMATS)}")
                if not Path(path).expanduser().is_file():
                    raise DataConfigError(f"{name}={path!r}: no such file")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "instruct"
        self._tokenizer: Any = None
        self.datasets: dict[str, Dataset] = {}
        self.predict_rows: list[dict[str, Any]] = []  # the raw rows, for writing generations beside them

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            h = self.hparams
            self._tokenizer = load_tokenizer(h.model_name_or_path, DECODER_HINT, gguf_file=h.gguf_file)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:  # tests and notebooks pass a tokenizer object
        self._tokenizer = tokenizer

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token, else EOS (GPT-2 and Llama have no pad token; masks hide it)."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _renderer(self) -> Renderer:
        h = self.hparams
        return Renderer(self.tokenizer, h.prompt_field, h.response_field, h.messages_field, h.use_chat_template)

    # ----------------------------------------------------------------------------- raw splits
    def _raw(self, split: str) -> tuple[list[dict[str, Any]], str] | None:
        """(rows, where) of a source split: train, validation, test or predict; None when not given."""
        h = self.hparams
        path = getattr(h, f"{split}_file")
        if path is not None:
            return read_rows(path, f"{split}_file"), str(path)
        name = {"train": h.train_split, "validation": h.validation_split, "test": h.test_split}.get(split)
        if h.dataset is None or name is None:
            return None
        import datasets

        where = f"{h.dataset}" + (f"/{h.dataset_config}" if h.dataset_config else "") + f" ({name})"
        prepare_for(h.dataset)
        try:
            ds = datasets.load_dataset(h.dataset, h.dataset_config, split=name)
        except Exception as err:  # offline, a typo, a split that does not exist: say so in one line
            if (hub := unreachable(h.dataset, "--data.dataset", INSTRUCTION_DATA_HINT)) is not None:
                raise hub from None
            raise DataConfigError(f"dataset={h.dataset!r}: could not load {where} ({first_line(err)})") from None
        return ds.to_list(), where

    def _source(self, split: str) -> dict[str, Any]:
        """What identifies a split's raw rows, for the cache key (file size and mtime, or the hub name)."""
        h = self.hparams
        path = getattr(h, f"{split}_file")
        if path is not None:
            return dict(zip(("file", "size", "mtime"), file_identity(path), strict=True))
        return {"hub": h.dataset, "config": h.dataset_config, "split": getattr(h, f"{split}_split", None)}

    def _splits(self) -> dict[str, tuple[Dataset, str, str]]:
        """Per split: the rows it uses (a `row` column), where they come from (for messages) and the
        source split (for the cache key); the few-shot protocol applied."""
        raw = self._raw("train")
        if raw is None:
            raise DataConfigError("train_file=None: training needs train_file (or dataset=<hub name>)")
        rows, where = raw
        train = Dataset.from_dict({"row": list(range(len(rows)))})
        h = self.hparams
        out: dict[str, tuple[Dataset, str, str]] = {}
        held_out = self._raw("validation") if h.k_shot is None else None
        if held_out is not None:
            out["train"] = (train, where, "train")
            out["validation"] = (Dataset.from_dict({"row": list(range(len(held_out[0])))}), held_out[1], "validation")
        else:
            k = train_size(h.k_shot, h.dev_size, len(rows), where)
            part_train, part_dev = few_shot_split(train, k, h.seed, h.dev_size, where)
            out["train"], out["validation"] = (part_train, where, "train"), (part_dev, where, "train")
        self._rows = {"train": rows, "validation": held_out[0] if held_out else rows}
        if (test := self._raw("test")) is not None:
            self._rows["test"] = test[0]
            out["test"] = (Dataset.from_dict({"row": list(range(len(test[0])))}), test[1], "test")
        return out

    # ----------------------------------------------------------------------------- tokenising
    def _encode(self, split: str, index: Dataset, where: str) -> Dataset:
        rows, renderer, max_length = self._rows[split], self._renderer(), self.hparams.max_seq_length

        def encode(batch: dict[str, list]) -> dict[str, list]:
            ids_out, labels_out = [], []
            for i in batch["row"]:
                ids, labels = [], []
                for seg, trained in renderer.segments(rows[i], _where(where, i)):
                    ids += seg
                    labels += seg if trained else [IGNORE_INDEX] * len(seg)
                ids, labels = truncate(ids, labels, max_length)
                ids_out.append(ids)
                labels_out.append(labels)
            return {"input_ids": ids_out, "labels": labels_out}

        return index.map(encode, batched=True, remove_columns=["row"], keep_in_memory=True,
                         new_fingerprint=cache_key(split=split, n=len(index)), desc=f"Tokenising {split}")

    def _cached(self, split: str, index: Dataset, where: str, source: str) -> Dataset:
        h = self.hparams
        key = cache_key(
            kind="instruct", split=split, source=self._source(source), rows=index["row"],
            tokenizer=tokenizer_identity(self.tokenizer),
            template=getattr(self.tokenizer, "chat_template", None),
            fields=[h.prompt_field, h.response_field, h.messages_field, h.use_chat_template],
            max_seq_length=h.max_seq_length,
        )
        return load_or_build(self.cache_dir / f"{split}-{key}", lambda: self._encode(split, index, where))

    def prepare_data(self) -> None:
        if self.hparams.train_file is not None or self.hparams.dataset is not None:
            self._load_fit()

    def _load_fit(self) -> None:
        for split, (index, where, source) in self._splits().items():
            self.datasets[split] = self._cached(split, index, where, source)
        self._rows = {}

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate", "test") and "train" not in self.datasets:
            self._load_fit()
        if stage == "test" and "test" not in self.datasets:
            raise DataConfigError("test_file=None: `test` needs test_file (or dataset=... with test_split)")
        if stage in (None, "predict") and self.hparams.predict_file is not None:
            self._load_predict()
        elif stage == "predict":
            raise DataConfigError(
                "predict_file=None: `predict` needs predict_file (JSON Lines, JSON, CSV, TSV or parquet)")

    def _load_predict(self) -> None:
        path = self.hparams.predict_file
        rows = read_rows(path, "predict_file")
        if not rows:
            raise DataConfigError(f"{path}: no rows to generate for")
        renderer, max_length = self._renderer(), self.hparams.max_seq_length
        prompts = [renderer.prompt_ids(r, _where(str(path), i))[-max_length:] for i, r in enumerate(rows)]
        self.predict_rows = rows
        self.datasets["predict"] = Dataset.from_dict({"input_ids": prompts, "row": list(range(len(rows)))})

    # ----------------------------------------------------------------------------- loaders
    def _loader(self, data: Dataset, batch_size: int, sampler: Sampler, left: bool = False,
                loader: type[DataLoader] = DataLoader) -> DataLoader:
        return data_loader(data, batch_size, sampler, CausalCollate(self.pad_id, left), self.hparams.num_workers,
                           loader)  # fmt: skip

    def _split(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise RuntimeError(f"the {name} split is not loaded: call setup() for its stage first")
        return self.datasets[name]

    def lengths(self, name: str) -> list[int]:
        return [len(ids) for ids in self._split(name)["input_ids"]]

    def train_dataloader(self) -> DataLoader:
        data, h = self._split("train"), self.hparams
        # As GLUE: the batch order belongs to the training seed (seed_everything), the split seed picks rows.
        sampler = BucketedRandomSampler(self.lengths("train"), h.batch_size, h.bucket_batches, torch.initial_seed())
        return self._loader(data, h.batch_size, sampler, loader=ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> DataLoader:
        data = self._split(name)
        return self._loader(data, self.hparams.eval_batch_size, eval_sampler(data, self.lengths(name)))

    def predict_dataloader(self) -> DataLoader:
        data = self._split("predict")
        # Longest prompts first (less left padding); the writer puts rows back in file order.
        order = longest_first(self.lengths("predict"))
        return self._loader(data, self.hparams.eval_batch_size, OrderedEvalSampler(data, order), left=True)


__all__ = [
    "IGNORE_INDEX",
    "BucketedRandomSampler",
    "CausalCollate",
    "InstructionDataModule",
    "Renderer",
    "padding_share",
    "read_rows",
    "truncate",
]
