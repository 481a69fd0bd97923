"""Do the gates pay for themselves? Every UniPELT run of this grid slimmed at several min_gates (issue 28).

    python results/minilm_k100_space/slim_study.py scores [RUNS ...]  # each run's slim.json (default: grid/, sweep/)
    python results/minilm_k100_space/slim_study.py time               # time.json: x the backbone (quiet machine!)
    python results/minilm_k100_space/slim_study.py report             # slim.md from the slim.json files and time.json

`scores` rebuilds each run from its best checkpoint as `cli.py slim` does (validate's settings), calibrates the
gates on the run's dev split (1000 rows), and for each min_gate in 0.05, 0.1, 0.2, 0.5 records what was removed and
the test score (GLUE dev) of the slimmed model beside the full model's; the full score must equal the one the
run recorded (a check that the rebuild is the run). Resumable: a run whose slim.json exists is skipped.
`time` times one slimmed run per method and threshold against the backbone at batch 1 x 32 and 8 x 128 (2
threads, interleaved rounds, medians), with the gated model and the calibrated merge beside it.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MIN_GATES = (0.05, 0.1, 0.2, 0.5)  # the three, and 0.5: where trained gates (~0.5-0.9) start to fall
SHAPES = ((1, 32), (8, 128))


def unipelt_runs(roots: list[Path]) -> list[Path]:
    runs = []
    for root in roots:
        for metrics in sorted(root.glob("**/metrics.json")):
            record = json.loads(metrics.read_text())
            if record.get("status") == "done" and str(record.get("method", "")).startswith("unipelt"):
                if any((metrics.parent / "checkpoints").glob("best-*.ckpt")):
                    runs.append(metrics.parent.resolve())
    return runs


def rebuild(run: Path):
    """The run's Lightning module (trained tensors loaded) and data module, as `cli.py slim` builds them."""
    from lightning_modules.checkpointing import load_checkpoint_file
    from lightning_modules.kinds import choose_kind
    from lightning_modules.run import PELTCLI, checkpoint_defaults

    ckpt = str(next((run / "checkpoints").glob("best-*.ckpt")))
    checkpoint = load_checkpoint_file(ckpt)
    kind = choose_kind(["--ckpt_path", ckpt])
    cli = PELTCLI(kind, args=["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"], run=False,
                  ckpt_defaults=checkpoint_defaults("validate", checkpoint, kind))
    cli.model.load_trainable(checkpoint)
    return cli.model, cli.datamodule


def test_score(module, model, loader) -> dict[str, float]:
    import torch

    metrics = module._metrics("test/")
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v for k, v in batch.items() if k != "idx"}
            metrics.update(module._predictions(model(**batch).logits.float()), batch["labels"])
    return {k: float(v) for k, v in metrics.compute().items()}


def scores(roots: list[Path]) -> None:
    import torch

    import unipelt

    torch.set_num_threads(2)
    for run in unipelt_runs(roots):
        out = run / "slim.json"
        if out.exists():
            continue
        started = time.perf_counter()
        module, data = rebuild(run)
        data.setup("validate")
        data.setup("test")
        tests = data.test_dataloader()
        loader = tests[0] if isinstance(tests, list) else tests
        recorded = json.loads((run / "metrics.json").read_text())["test"]
        full = test_score(module, module.model, loader)
        result = {"run": str(run.relative_to(HERE)), "method": module.hparams.method, "full": full,
                  "recorded": recorded, "slim": {}}
        previous = None
        for min_gate in MIN_GATES:
            if previous and sorted(k for k, v in previous["all_gates"].items() if v < min_gate) == previous["removed"]:
                result["slim"][str(min_gate)] = previous["entry"]  # the same parts removed: the same model
                continue
            slimmed = unipelt.slim(copy.deepcopy(module.model), data.val_dataloader(), min_gate=min_gate)
            report = slimmed.pelt_slim_report
            result["slim"][str(min_gate)] = {
                "removed": sorted(set(report.gates) - set(report.kept)), "gates": len(report.gates),
                "folded": list(report.folded), "dev_max_logit_diff": report.max_logit_diff,
                "dev_agreement": report.agreement, "test": test_score(module, slimmed, loader)}
            previous = {"all_gates": report.gates, "removed": result["slim"][str(min_gate)]["removed"],
                        "entry": result["slim"][str(min_gate)]}
        result["lowest_gate"] = min(report.gates.values())
        result["seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{result['run']}: full {full}, recorded {recorded}, "
              + ", ".join(f"{g}: -{len(v['removed'])} {v['test']}" for g, v in result["slim"].items()))


def median_times(models: dict[str, object], inputs: dict, rounds: int = 15) -> dict[str, float]:
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(**inputs)  # warm-up
        names = list(models)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
                start = time.perf_counter()
                models[name](**inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timing() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    import unipelt
    from lightning_modules.base import load_backbone

    torch.set_num_threads(2)
    firsts: dict[str, Path] = {}
    for run in unipelt_runs([HERE / "grid", HERE / "sweep"]):
        firsts.setdefault(json.loads((run / "metrics.json").read_text())["method"], run)
    result = {}
    for method, run in sorted(firsts.items()):
        module, data = rebuild(run)
        data.setup("validate")
        model = module.model.eval()
        backbone = load_backbone(AutoModelForSequenceClassification, module.hparams.model_name_or_path,
                                 config={"num_labels": model.config.num_labels}).eval()
        models = {"backbone": backbone, "gated": model,
                  "merged": unipelt.merge(copy.deepcopy(model), unipelt.calibrate_gates(model, data.val_dataloader()))}
        for min_gate in MIN_GATES:
            models[f"slim {min_gate}"] = unipelt.slim(copy.deepcopy(model), data.val_dataloader(), min_gate=min_gate)
        g = torch.Generator().manual_seed(0)
        for batch, length in SHAPES:
            inputs = {"input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
                      "attention_mask": torch.ones(batch, length, dtype=torch.long)}
            med = median_times(models, inputs)
            result[f"{method} {batch}x{length}"] = {
                "run": str(run.relative_to(HERE)), "backbone_ms": med["backbone"] * 1e3,
                **{name: med[name] / med["backbone"] for name in models if name != "backbone"}}
            print(method, f"{batch}x{length}", {k: round(v, 3) for k, v in result[f"{method} {batch}x{length}"].items()
                                                 if isinstance(v, float)})
    (HERE / "time.json").write_text(json.dumps(result, indent=1) + "\n")


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(HERE.glob("**/slim.json"))]
    lines = ["# Slimming the UniPELT runs (all-MiniLM-L6-v2, K=100)", "",
             "Generated by `python results/minilm_k100_space/slim_study.py report`. Gates calibrated on each run's "
             "dev split; test = GLUE dev. Removed: gated parts (per layer) whose mean gate fell below min_gate.", "",
             "| run | lowest gate | full test | " + " | ".join(f"min_gate {g}: removed / test" for g in MIN_GATES)
             + " |",
             "|---|---:|---:|" + "---:|" * len(MIN_GATES)]
    for r in rows:
        metric = next(iter(r["full"]))
        cells = [f"{len(v['removed'])}/{v['gates']} / {100 * v['test'][metric]:.2f}" for v in r["slim"].values()]
        head = f"| {r['run']} | {r['lowest_gate']:.3f} | {100 * r['full'][metric]:.2f} | "
        lines.append(head + " | ".join(cells) + " |")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:  # run: [sweep/<arm>/]<grid|...>/<task>/k100/<method>/seed<N>
        parts = r["run"].split("/")
        groups.setdefault((parts[-4], parts[-2]), []).append(r)
    lines += ["", "Per task and method, over its runs (the grid's seeds and the sweep's seed-0 runs at other rates): "
              "mean score change slimmed − full, points, and the parts removed over all runs.", "",
              "| task | method | runs | lowest gate (min) | full test (mean) | "
              + " | ".join(f"{g}: change / removed" for g in MIN_GATES) + " |",
              "|---|---|---:|---:|---:|" + "---:|" * len(MIN_GATES)]
    for (task, method), runs in sorted(groups.items()):
        metric = next(iter(runs[0]["full"]))
        cells = []
        for g in MIN_GATES:
            slims = [r["slim"][str(g)] for r in runs]
            pairs = zip(slims, runs, strict=True)
            change = statistics.fmean(100 * (v["test"][metric] - r["full"][metric]) for v, r in pairs)
            cells.append(f"{change:+.2f} / {sum(len(v['removed']) for v in slims)} of {sum(v['gates'] for v in slims)}")
        full = statistics.fmean(100 * r["full"][metric] for r in runs)
        lines.append(f"| {task} | {method} | {len(runs)} | {min(r['lowest_gate'] for r in runs):.3f} | {full:.2f} | "
                     + " | ".join(cells) + " |")
    timing_path = HERE / "time.json"
    if timing_path.exists():
        times = json.loads(timing_path.read_text())
        names = [k for k in next(iter(times.values())) if k not in ("run", "backbone_ms")]
        lines += ["", "Inference time x the backbone (2 threads, medians of 15 interleaved rounds, `time`):", "",
                  "| method, batch | backbone ms | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for key, t in times.items():
            lines.append(f"| {key} | {t['backbone_ms']:.1f} | " + " | ".join(f"{t[n]:.2f}" for n in names) + " |")
    (HERE / "slim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    command, *rest = sys.argv[1:] or ["report"]
    sys.argv[1:] = []  # the CLI built inside reads no argv
    if command == "scores":
        scores([Path(p) for p in rest] or [HERE / "grid", HERE / "sweep"])
    elif command == "time":
        timing()
    else:
        report()
