"""A tiny word-level tokenizer with BOS/EOS and a chat template, built in memory (no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = (
    "the a an cat dog bird man woman child house car tree river sky sun moon good bad happy sad big small "
    "runs walks sees likes eats has is was not no yes very quite red blue green old new fast slow "
    "what who where why how answer question tell me about . , ? !"
).split()
# Renders every turn as `<|role|> content <|end|>`; the generation prompt is `<|assistant|>`.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat: bool = True, pad: bool = False) -> PreTrainedTokenizerFast:
    """Word-level: every word of WORDS is one token; BOS is prepended by the tokenizer (as Llama's does)."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>" if pad else None, additional_special_tokens=SPECIAL[4:],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def sentence(rng: random.Random, low: int = 2, high: int = 9) -> str:
    return " ".join(rng.choice(WORDS[:-4]) for _ in range(rng.randint(low, high)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows(n: int, seed: int = 0, low: int = 2, high: int = 9) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, low, high), "response": sentence(rng, low, high), "id": i} for i in range(n)]
