"""Size of an exported model and the time to load it onto an already-loaded backbone; inference time of
the gated model against its merges.

Prints tables (no asserts). bert-base size from a random config (no download). Load =
`unipelt.from_pretrained(folder, model=backbone)` on a fresh copy of the backbone (the copy is not
timed): reading the safetensors file, checking identity, injecting the submodules and copying the
weights. Rounds are interleaved (every preset once per round, order rotated) and medians reported;
wall clock, at ``--threads`` threads. Inference: eval forward under ``torch.inference_mode`` of the
gated UniPELT (APL), of its merge with calibrated gates (LoRA merged, adapter/prefix kept with constant
gates), of the ungated LoRA preset merged into a plain model, and of the plain backbone.

    python benchmarks/export_load.py --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install
import unipelt  # noqa: E402
from unipelt import PELTConfig, apply_pelt  # noqa: E402
from unipelt.io import WEIGHTS_NAME  # noqa: E402

CLOCK = time.perf_counter


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["unipelt_apl", "unipelt_ap", "lora", "adapter", "prefix",
                                                         "bitfit"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--no-inference", action="store_true", help="only sizes and load times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    backbone = BertForSequenceClassification(BertConfig(num_labels=2)).eval()  # bert-base sizes, random
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, backbone.config.vocab_size, (args.batch, args.length), generator=g),
              "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long)}
    inputs["attention_mask"][1::2, args.length // 2:] = 0

    with tempfile.TemporaryDirectory() as tmp:
        folders, models = {}, {}
        for preset in args.presets:
            model = apply_pelt(copy.deepcopy(backbone), PELTConfig.preset(preset)).eval()
            with torch.no_grad():  # non-trivial LoRA B (zero at init)
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.02)
            models[preset] = model
            folders[preset] = unipelt.save_pretrained(model, Path(tmp) / preset, base_model_name_or_path="bert-base")

        loads: dict[str, list[float]] = {p: [] for p in args.presets}
        for r in range(args.rounds):
            order = args.presets[r % len(args.presets):] + args.presets[: r % len(args.presets)]
            for preset in order:
                fresh = copy.deepcopy(backbone)  # not timed
                loads[preset].append(timed(partial(unipelt.from_pretrained, folders[preset], model=fresh)))
                del fresh

        print(f"bert-base (random config), {args.threads} threads, median of {args.rounds} interleaved rounds\n")
        print(f"| preset | trainable params | {WEIGHTS_NAME} (MB) | load onto a loaded backbone (s) |")
        print("|---|---:|---:|---:|")
        for preset in args.presets:
            size = (folders[preset] / WEIGHTS_NAME).stat().st_size / 1e6
            print(f"| {preset} | {unipelt.count_trainable(models[preset]):,} | {size:.2f} | "
                  f"{statistics.median(loads[preset]):.4f} |")

    if args.no_inference or "unipelt_apl" not in models or "lora" not in models:
        return
    apl = models["unipelt_apl"]
    calibration = [{k: v[i:i + 2] for k, v in inputs.items()} for i in range(0, args.batch, 2)]
    variants = {
        "backbone": backbone,
        "unipelt_apl (gated)": apl,
        "unipelt_apl merged, calibrated gates": unipelt.merge(apl, unipelt.calibrate_gates(apl, calibration)),
        "lora": models["lora"],
        "lora merged (plain)": unipelt.merge(models["lora"]),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.inference_mode():
        for model in variants.values():
            model(**inputs)  # warm-up, fills the prefix cache
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(timed(partial(variants[name], **inputs)))
    base = statistics.median(times["backbone"])
    print(f"\ninference, batch {args.batch} x {args.length} tokens (half the rows half padded)\n")
    print("| model | forward (s) | vs backbone |")
    print("|---|---:|---:|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.4f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
