"""UniPELT (APL) on a random Llama-style decoder: train step vs PEFT LoRA, generation vs the plain backbone.

    python benchmarks/decoder_step.py [--threads 2] [--rounds 5] [--layers 12]

Wall clock at `--threads` CPU threads (as users run it), interleaved rounds (A B A B ...) so that
load on the machine hits both sides alike, medians of the per-round times; the ratios are of
medians from the same run, and "per round" gives each round's ratio as median [min-max].
Config: 12 layers, hidden 768, 12 heads, 4 key/value heads, intermediate 2048, vocabulary 32000;
train on batch 8 x 256 tokens; generation: batch 4, a 32-token prompt, 64 new tokens, greedy,
with the KV cache. Both train with the AdamW that ``cli.py fit`` uses (fused on the CPU).
Targets (issue 12): train <= 1.15 x PEFT LoRA (r 8, q and v); generation <= 1.10 x backbone.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install
from lightning_modules.base import adamw  # noqa: E402
from unipelt import PELTConfig, apply_pelt  # noqa: E402


def backbone(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def peft_lora(model: LlamaForCausalLM) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def generate(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, min_new_tokens=64,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def interleaved(runs: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Per-round times of each run, A B A B ... after one warm-up call each (allocations, first-call paths)."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(fn())
    return times


def row(measure: str, times: dict[str, list[float]], reference: str, target: float) -> str:
    """A table row: medians, their ratio, and the per-round ratios (each round's pair) as median [min-max]:
    how far one run's ratio can be trusted on a host whose speed drifts."""
    ours, ref = times["UniPELT (APL)"], times[reference]
    paired = [a / b for a, b in zip(ours, ref, strict=True)]
    return (f"| {measure} | {statistics.median(ours):.2f} s | {reference} {statistics.median(ref):.2f} s | "
            f"{statistics.median(ours) / statistics.median(ref):.2f} | {statistics.median(paired):.2f} "
            f"[{min(paired):.2f}-{max(paired):.2f}] | <= {target:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = backbone(args.layers)
    unipelt = apply_pelt(copy.deepcopy(base), PELTConfig.preset("unipelt_apl")).train()
    lora = peft_lora(copy.deepcopy(base)).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32000, (8, 256), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizers = {name: adamw([{"params": [p for p in m.parameters() if p.requires_grad]}], lr=1e-4)
                  for name, m in (("unipelt", unipelt), ("lora", lora))}
    train = interleaved({"UniPELT (APL)": lambda: train_step(unipelt, optimizers["unipelt"], batch),
                         "PEFT LoRA": lambda: train_step(lora, optimizers["lora"], batch)}, args.rounds)

    unipelt.eval()
    base.eval()
    prompt = torch.randint(1, 32000, (4, 32), generator=g)
    gen = interleaved({"UniPELT (APL)": lambda: generate(unipelt, prompt),
                       "backbone": lambda: generate(base, prompt)}, args.rounds)

    print(f"random Llama-style decoder, {args.layers} layers, hidden 768, 12 heads / 4 kv heads; "
          f"{args.threads} threads, {args.rounds} interleaved rounds, medians")
    print("| measure | UniPELT (APL) | reference | ratio | per round | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(row("train step, batch 8 x 256", train, "PEFT LoRA", 1.15))
    print(row("generate, batch 4, 64 new tokens", gen, "backbone", 1.10))


if __name__ == "__main__":
    main()
