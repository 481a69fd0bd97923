"""UniPELT (APL) on a random Llama-style decoder: train step vs PEFT LoRA, generation vs the plain backbone.

    python benchmarks/decoder_step.py [--threads 2] [--rounds 5] [--layers 12] [--device cuda]

Wall clock at `--threads` CPU threads (as users run it), interleaved rounds (A B A B ...) so that
load on the machine hits both sides alike, medians of the per-round times; the ratios are of
medians from the same run, and "per round" gives each round's ratio as median [min-max].
Config: 12 layers, hidden 768, 12 heads, 4 key/value heads, intermediate 2048, vocabulary 32000;
train on batch 8 x 256 tokens; generation: batch 4, a 32-token prompt, 64 new tokens, greedy,
with the KV cache. Both train with the AdamW that ``cli.py fit`` uses (fused on the CPU).
Targets (issue 12): train <= 1.15 x PEFT LoRA (r 8, q and v); generation <= 1.10 x backbone.
``--device cuda``: models and inputs on the GPU, synchronised around every timed call.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
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


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued kernels, so a wall-clock time covers them (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    synchronize(batch["input_ids"].device)
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(batch["input_ids"].device)
    return time.perf_counter() - start


def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 64) -> float:
    synchronize(prompt.device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    synchronize(prompt.device)
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


def summary(measure: str, times: dict[str, list[float]], reference: str, target: float) -> dict:
    """Medians, their ratio, and the per-round ratios (each round's pair): how far one run's ratio can be
    trusted on a host whose speed drifts."""
    ours, ref = times["UniPELT (APL)"], times[reference]
    paired = [a / b for a, b in zip(ours, ref, strict=True)]
    return {"measure": measure, "unipelt_s": statistics.median(ours), "reference": reference,
            "reference_s": statistics.median(ref), "ratio": statistics.median(ours) / statistics.median(ref),
            "per_round": [statistics.median(paired), min(paired), max(paired)], "target": target}


def row(r: dict) -> str:
    """A table row: medians, their ratio, and the per-round ratios as median [min-max]."""
    middle, low, high = r["per_round"]
    return (f"| {r['measure']} | {r['unipelt_s']:.3f} s | {r['reference']} {r['reference_s']:.3f} s | "
            f"{r['ratio']:.2f} | {middle:.2f} [{low:.2f}-{high:.2f}] | <= {r['target']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--length", type=int, default=256, help="tokens per training row (batch 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (batch 4)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (models and inputs on the GPU)")
    parser.add_argument("--json", help="also write the two rows to this JSON file")
    args = parser.parse_args()
    if args.device != "cpu" and not (re.fullmatch(r"cuda(:\d+)?", args.device) and torch.cuda.is_available()):
        parser.error(f"--device {args.device}: cpu or cuda[:N]"
                     f"{'' if torch.cuda.is_available() else ' (torch sees no CUDA GPU here: cpu only)'}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    base = backbone(args.layers).to(device)
    unipelt = apply_pelt(copy.deepcopy(base), PELTConfig.preset("unipelt_apl")).train()
    lora = peft_lora(copy.deepcopy(base)).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32000, (8, args.length), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizers = {name: adamw([{"params": [p for p in m.parameters() if p.requires_grad]}], lr=1e-4)
                  for name, m in (("unipelt", unipelt), ("lora", lora))}
    train = interleaved({"UniPELT (APL)": lambda: train_step(unipelt, optimizers["unipelt"], batch),
                         "PEFT LoRA": lambda: train_step(lora, optimizers["lora"], batch)}, args.rounds)

    unipelt.eval()
    base.eval()
    prompt = torch.randint(1, 32000, (4, 32), generator=g).to(device)
    gen = interleaved({"UniPELT (APL)": lambda: generate(unipelt, prompt, args.new_tokens),
                       "backbone": lambda: generate(base, prompt, args.new_tokens)}, args.rounds)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"random Llama-style decoder, {args.layers} layers, hidden 768, 12 heads / 4 kv heads; "
          f"{where}, {args.rounds} interleaved rounds, medians")
    rows = [summary(f"train step, batch 8 x {args.length}", train, "PEFT LoRA", 1.15),
            summary(f"generate, batch 4, {args.new_tokens} new tokens", gen, "backbone", 1.10)]
    print("| measure | UniPELT (APL) | reference | ratio | per round | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
