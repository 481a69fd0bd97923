"""Tiny files the tests write: a random BERT model folder with its tokenizer, and GLUE-layout TSVs.

Seconds to build, no downloads: the real code paths (from_pretrained on a folder, TSV parsing)
run on them exactly as they run on bert-base and ../shared/glue.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, RobertaConfig

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an cat dog bird man woman child house car tree river sky sun moon good bad happy sad big small "
    "runs walks sees likes eats has is was not no yes very quite red blue green old new fast slow"
).split()
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"


def write_tiny_model(path: Path, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0) -> Path:
    """A random BERT encoder + WordPiece tokenizer saved like a pretrained checkpoint."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS + list("abcdefghijklmnopqrstuvwxyz.,!?")) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)  # transformers 5 ignores vocab_file=
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    return path


def tiny_bert_config(**overrides) -> BertConfig:
    defaults = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return BertConfig(**{**defaults, **overrides})


def tiny_roberta_config(**overrides) -> RobertaConfig:
    defaults = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=70,
        pad_token_id=1,
    )
    return RobertaConfig(**{**defaults, **overrides})


def _sentence(rng: random.Random, low: int = 3, high: int = 9) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_rte(root: Path, n_train: int = 60, n_dev: int = 21, seed: int = 0) -> Path:
    """RTE in GLUE's layout (index, sentence1, sentence2, label as a word); label learnable from 'not'."""
    rng = random.Random(seed)
    folder = root / "RTE"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            neg = rng.random() < 0.5
            s2 = _sentence(rng) + (" not" if neg else "")
            rows.append(f"{i}\t{_sentence(rng)}\t{s2}\t{'not_entailment' if neg else 'entailment'}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    (folder / "test.tsv").write_text("index\tsentence1\tsentence2\n0\ta cat\ta dog\n")
    return root


def write_stsb(root: Path, n_train: int = 60, n_dev: int = 21, seed: int = 0) -> Path:
    """STS-B in GLUE's layout: ten columns, a float score in the last."""
    rng = random.Random(seed)
    folder = root / "STS-B"
    folder.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [header]
        for i in range(n):
            rows.append(
                f"{i}\tmain-news\tf\t2012\t{i}\tnone\tnone\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.uniform(0, 5):.3f}"
            )
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def enable_checkpointing(model: torch.nn.Module, enable: bool = True, **kwargs) -> None:
    """transformers' activation checkpointing on (or off) by its current name (5.x deprecates
    `gradient_checkpointing_enable`/`_disable`, with a FutureWarning); ``kwargs`` go to torch's checkpoint,
    e.g. ``use_reentrant=True``."""
    if not enable:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    elif hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
