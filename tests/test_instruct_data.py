"""InstructionDataModule on files the tests write, with a tiny word-level tokenizer built in memory."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from decoder_fixtures import prompt_rows, sentence, tiny_tokenizer, write_jsonl

from datamodules.errors import DataConfigError
from datamodules.instruct import (
    IGNORE_INDEX,
    BucketedRandomSampler,
    InstructionDataModule,
    padding_share,
    truncate,
)


def make(tmp_path: Path, tokenizer=None, **kwargs) -> InstructionDataModule:
    dm = InstructionDataModule("unused", cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.tokenizer = tokenizer or tiny_tokenizer()
    return dm


def encode(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def test_prompt_response_rows_train_on_the_response_and_eos_only(tmp_path) -> None:
    rows = prompt_rows(30)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = make(tmp_path, train_file=str(train), k_shot=10, dev_size=5, seed=3)
    dm.setup("fit")
    tok = dm.tokenizer
    data = dm.datasets["train"]
    assert len(data) == 10 and len(dm.datasets["validation"]) == 5
    order = np.random.default_rng(3).permutation(30)  # Dataset.shuffle(seed) draws this permutation
    for j, example in enumerate(data):
        row = rows[order[j]]
        prompt, response = encode(tok, row["prompt"], True), encode(tok, row["response"]) + [tok.eos_token_id]
        assert example["input_ids"] == prompt + response  # tokenised apart: as generate() will see the prompt
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
    dev_prompts = [tok.decode(e["input_ids"]) for e in dm.datasets["validation"]]
    expected = [rows[i]["prompt"] for i in order[10:15]]
    assert [p.startswith("<bos> " + e) for p, e in zip(dev_prompts, expected, strict=True)] == [True] * 5


def test_chat_messages_train_on_every_assistant_turn_and_nothing_else(tmp_path) -> None:
    conversation = [
        {"role": "system", "content": "tell me about the cat"},
        {"role": "user", "content": "what is the cat"},
        {"role": "assistant", "content": "a small cat"},
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "the cat is happy"},
    ]
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}] * 4)
    dm = make(tmp_path, train_file=str(train), validation_file=str(train))
    dm.setup("fit")
    example = dm.datasets["train"][0]
    tok = dm.tokenizer
    full = tok.apply_chat_template(conversation, tokenize=False)
    assert tok.decode(example["input_ids"]) == tok.decode(encode(tok, full))
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example["input_ids"], example["labels"], strict=True))
    # What is trained is each answer and its end-of-turn token, in order.
    assert tok.decode(trained) == "a small cat <|end|> the cat is happy <|end|>"


def test_prompt_response_through_the_chat_template(tmp_path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "what is the cat", "response": "a dog"}] * 3)
    dm = make(tmp_path, train_file=str(train), validation_file=str(train), use_chat_template=True)
    dm.setup("fit")
    example, tok = dm.datasets["train"][0], dm.tokenizer
    assert tok.decode(example["input_ids"]) == "<bos> <|user|> what is the cat <|end|> <|assistant|> a dog <|end|>"
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "a dog <|end|>"


def test_csv_and_json_array_read_as_jsonl(tmp_path) -> None:
    rows = prompt_rows(12, seed=1)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows))
    table = tmp_path / "a.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "response", "id"])
        writer.writeheader()
        writer.writerows(rows)
    built = []
    for i, path in enumerate((jsonl, array, table)):
        dm = make(tmp_path / str(i), train_file=str(path), k_shot=6, dev_size=4)
        dm.setup("fit")
        built.append((dm.datasets["train"]["input_ids"], dm.datasets["validation"]["labels"]))
    assert built[0] == built[1] == built[2]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', ".jsonl", "x.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n[1, 2]\n', ".jsonl", "x.jsonl:2: expected a JSON object per line"),
        ('{"prompt": "a", "answer": "b"}\n', ".jsonl", "x.jsonl row 1: needs a text 'response' field"),
        ('{"question": "a"}\n', ".jsonl", "x.jsonl row 1: needs a text 'prompt' field"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', ".jsonl", "has no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "a"}]}\n', ".jsonl", "'messages' must be a non-empty list"),
        ("prompt,response\na,b,c\n", ".csv", "x.csv:2: expected 2 comma-separated fields"),
        ("prompt\tresponse\n", ".tsv", "the file has no data rows"),
        ("prompt,response\n", ".xml", "unknown file type"),
    ],
)
def test_bad_files_fail_in_one_line_naming_file_and_problem(tmp_path, content, suffix, message) -> None:
    path = tmp_path / f"x{suffix}"
    path.write_text(content)
    with pytest.raises(DataConfigError, match=message.replace("[", r"\[").replace("?", r"\?")) as err:
        dm = make(tmp_path, train_file=str(path), validation_file=str(path))
        dm.setup("fit")
    assert "\n" not in str(err.value)


def test_bad_options_and_impossible_splits(tmp_path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", prompt_rows(10))
    with pytest.raises(DataConfigError, match=r"k_shot=8 \+ dev_size=5 = 13 is more than the 10 rows"):
        make(tmp_path, train_file=str(train), k_shot=8, dev_size=5).setup("fit")
    with pytest.raises(DataConfigError, match="k_shot=0"):
        make(tmp_path, train_file=str(train), k_shot=0)
    with pytest.raises(DataConfigError, match="train_file=.*no such file"):
        make(tmp_path, train_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataConfigError, match="drop validation_file"):
        make(tmp_path, train_file=str(train), validation_file=str(train), k_shot=4)
    with pytest.raises(DataConfigError, match="chat template"):
        chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}])
        make(tmp_path, tiny_tokenizer(chat=False), train_file=str(chat), validation_file=str(chat)).setup("fit")


def test_full_data_holds_out_dev_size_rows_and_caches(tmp_path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", prompt_rows(40))
    dm = make(tmp_path, train_file=str(train), dev_size=8)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 32 and len(dm.datasets["validation"]) == 8
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2
    again = make(tmp_path, train_file=str(train), dev_size=8)
    again.setup("fit")  # from the cache: the same rows
    assert again.datasets["train"]["input_ids"] == dm.datasets["train"]["input_ids"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached


def test_truncation_keeps_response_tokens() -> None:
    ids, labels = list(range(10)), [IGNORE_INDEX] * 8 + [8, 9]
    assert truncate(ids, labels, 6) == (ids[-6:], labels[-6:])  # cutting the end would leave nothing to learn
    labels = [IGNORE_INDEX] * 2 + list(range(2, 10))
    assert truncate(ids, labels, 6) == (ids[:6], labels[:6])
    assert truncate(ids, labels, 20) == (ids, labels)


def test_train_batches_right_padded_and_masked(tmp_path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", prompt_rows(20))
    dm = make(tmp_path, train_file=str(train), k_shot=12, dev_size=4, batch_size=4)
    dm.setup("fit")
    tok = dm.tokenizer
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        lengths = batch["attention_mask"].sum(1)
        for row, n in enumerate(lengths.tolist()):
            assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
            assert (batch["input_ids"][row, n:] == tok.eos_token_id).all()  # no pad token: EOS pads, masked


def test_bucketing_keeps_padding_a_small_share(tmp_path) -> None:
    rng = random.Random(0)
    rows = [{"prompt": sentence(rng, 2, 6), "response": sentence(rng, 1, int(rng.lognormvariate(3, 0.8)) + 2)}
            for _ in range(400)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    shares = {}
    for buckets in (1, 8, 64):
        dm = make(tmp_path / str(buckets), train_file=str(train), k_shot=384, dev_size=16, batch_size=8,
                  bucket_batches=buckets, max_seq_length=256)
        dm.setup("fit")
        shares[buckets] = padding_share(dm.train_dataloader())
        lengths = sorted(dm.lengths("train"), reverse=True)
    # The least padding any batching of 8 rows can have: consecutive rows of the length-sorted split.
    chunks = [lengths[b:b + 8] for b in range(0, len(lengths), 8)]
    floor = 1 - sum(lengths) / sum(c[0] * len(c) for c in chunks)
    print(f"padding share: random batches {shares[1]:.3f}, groups of 8 batches {shares[8]:.3f}, "
          f"of 64 {shares[64]:.3f}, best possible {floor:.3f}")
    assert shares[64] == pytest.approx(floor)  # 384 rows < 64 batches: the whole split sorted at once
    assert floor < shares[8] < 0.5 * shares[1] and shares[1] > 0.3


def test_bucketed_sampler_is_a_seeded_permutation_that_resumes() -> None:
    lengths = [random.Random(i).randint(1, 50) for i in range(103)]
    sampler = BucketedRandomSampler(lengths, batch_size=4, bucket_batches=5, seed=7)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(103))
    batches = [order[b:b + 4] for b in range(0, 103, 4)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch comes first
    assert len(batches[-1]) == 3  # the short batch last: the DataLoader's cuts match the batches
    # Each batch is a run of one sorted group of 20 rows: its rows are adjacent in length order.
    for batch in batches:
        group = next(g for g in range(0, 103, 20) if batch[0] in sampler_groups(sampler, 2)[g // 20])
        ranks = sorted(sorted(sampler_groups(sampler, 2)[group // 20], key=lambda i: -lengths[i]).index(i)
                       for i in batch)
        assert ranks == list(range(ranks[0], ranks[0] + len(batch)))
    sampler.set_epoch(3)
    assert list(sampler) != order
    sampler.set_epoch(2)
    sampler.start = 32  # a resumed epoch skips what was trained on
    assert list(sampler) == order[32:]
    assert list(sampler) == order


def sampler_groups(sampler: BucketedRandomSampler, epoch: int) -> list[list[int]]:
    """The epoch's groups, from the parent's permutation (computed without the subclass)."""
    sampler.set_epoch(epoch)
    perm = list(super(BucketedRandomSampler, sampler).__iter__())
    return [perm[g:g + sampler.group] for g in range(0, len(perm), sampler.group)]


def test_predict_batches_are_left_padded_prompts(tmp_path) -> None:
    rows = [{"prompt": "what is the cat", "id": "a"},
            {"messages": [{"role": "user", "content": "who"}, {"role": "assistant", "content": "a man"}], "id": "b"},
            {"prompt": "the", "response": "reference", "id": "c"}]
    predict = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = make(tmp_path, predict_file=str(predict), eval_batch_size=3)
    dm.setup("predict")
    assert dm.predict_rows == rows
    batch = next(iter(dm.predict_dataloader()))
    tok = dm.tokenizer
    expected = {0: encode(tok, "what is the cat", True), 2: encode(tok, "the", True),
                1: encode(tok, "<bos><|user|> who <|end|> <|assistant|> ")}  # the reference answer is dropped
    width = batch["input_ids"].shape[1]
    for j, row in enumerate(batch["row"].tolist()):
        ids = expected[row]
        assert batch["input_ids"][j, width - len(ids):].tolist() == ids
        assert batch["attention_mask"][j].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
    assert torch.equal(batch["row"].sort().values, torch.arange(3))
