"""A multi-task model's step against a single-task model's on the same batch, and what the tasks add in memory.

The same backbone weights, UniPELT (APL) with `cls_mlp` heads: a single-task model (2 labels) and a
multi-task model of SST-2 + CoLA + STS-B + RTE (2, 2, 1 and 2 labels; gates per task as a bank, or shared
gates with a task embedding). Every round times one train step (forward + backward + fused AdamW step, as
`cli.py fit` trains; the multi-task model's task changes every step, as in a multi-task epoch) and one
inference of each model, the order rotated each round; the table gives the median of the per-round ratios
to the single-task model. Parameters: trainable (as the paper counts them) and their AdamW state, which
grows only by what the extra heads and gate banks hold.

    python benchmarks/multitask_step.py --models minilm --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install
from benchmarks.step_time import build_backbone, timed  # noqa: E402
from lightning_modules.base import adamw  # noqa: E402
from unipelt import PELTConfig, apply_pelt, count_trainable  # noqa: E402
from unipelt.gates import GateBank  # noqa: E402

TASKS = {"sst2": 2, "cola": 2, "stsb": 1, "rte": 2}
SINGLE = "single-task"


def models_for(name: str, preset: str) -> dict[str, torch.nn.Module]:
    backbone = build_backbone(name)
    built = {SINGLE: apply_pelt(copy.deepcopy(backbone), PELTConfig.preset(preset, head="cls_mlp"))}
    for gates in ("bank", "embedding"):
        config = PELTConfig.preset(preset, head="cls_mlp", tasks=TASKS, task_gates=gates)
        built[f"4 tasks, {gates}"] = apply_pelt(copy.deepcopy(backbone), config)
    return built


def breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters: all (as the paper counts them), the heads', the gate banks'."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    banks = {n for n, m in model.named_modules() if isinstance(m, GateBank)}
    return {
        "trainable": count_trainable(model),
        "heads": sum(v for n, v in trainable.items() if n.startswith("pelt_head.")),
        "gates": sum(v for n, v in trainable.items() if any(n.startswith(b + ".") for b in banks)),
    }


def bench(name: str, args: argparse.Namespace) -> list[dict]:
    models = models_for(name, args.preset)
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    inputs = {"input_ids": torch.randint(1000, vocab, (args.batch, args.length), generator=g),
              "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long)}
    labels = {task: (torch.rand(args.batch, generator=g) * 5 if n == 1 else torch.randint(0, n, (args.batch,),
                                                                                            generator=g))
              for task, n in TASKS.items()}
    optims = {k: adamw([{"params": [p for p in m.parameters() if p.requires_grad]}], lr=1e-5)
              for k, m in models.items()}
    tasks = list(TASKS)
    step = {"n": 0}

    def forward(key: str, model: torch.nn.Module, train: bool) -> object:
        if key == SINGLE:
            return model(**inputs, labels=labels["sst2"] if train else None)
        task = tasks[step["n"] % len(tasks)]  # the multi-task model: another task every round
        return model(**inputs, task=task, labels=labels[task] if train else None)

    def train_step(key: str) -> None:
        model, opt = models[key], optims[key]
        model.train()
        opt.zero_grad(set_to_none=True)
        forward(key, model, train=True).loss.backward()
        opt.step()

    def infer(key: str) -> None:
        model = models[key]
        model.eval()
        with torch.inference_mode():
            forward(key, model, train=False)

    order = list(models)
    ratios: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in models}
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in models}
    for rnd in range(args.warmup + args.rounds):
        order = order[1:] + order[:1]
        this = {k: {"train": timed(lambda k=k: train_step(k)), "infer": timed(lambda k=k: infer(k))} for k in order}
        step["n"] += 1
        if rnd >= args.warmup:
            for k in models:
                for what in ("train", "infer"):
                    times[k][what].append(this[k][what])
                    ratios[k][what].append(this[k][what] / this[SINGLE][what])
        print(f"  {name}: round {rnd + 1}/{args.warmup + args.rounds}, load {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)
    rows = []
    for key, model in models.items():
        counts = breakdown(model)
        state = sum(t.numel() for s in optims[key].state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
        rows.append({"model": name, "variant": key, **counts, "adam_state": state,
                     "train_s": statistics.median(times[key]["train"]),
                     "train_ratio": statistics.median(ratios[key]["train"]),
                     "infer_s": statistics.median(times[key]["infer"]),
                     "infer_ratio": statistics.median(ratios[key]["infer"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm"], help="minilm (real) or a random config of "
                        "benchmarks/step_time.py (bert-base, ...)")
    parser.add_argument("--preset", default="unipelt_apl")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset}, batch {args.batch} x "
          f"{args.length}, {args.rounds} rounds (+{args.warmup} warm-up), medians of per-round ratios, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = [row for name in args.models for row in bench(name, args)]
    print("| model | variant | trainable params | of which heads | of which gates | AdamW state | train step s "
          "| train / single | inference s | inference / single |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['trainable']:,} | {r['heads']:,} | {r['gates']:,} "
              f"| {r['adam_state']:,} | {r['train_s']:.3f} | {r['train_ratio']:.3f} | {r['infer_s']:.3f} "
              f"| {r['infer_ratio']:.3f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
