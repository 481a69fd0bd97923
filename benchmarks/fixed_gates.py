"""What fixing the gates costs in test accuracy and gains in inference time, on finished `cli.py fit` runs.

For each run folder: load `<run>/export/` with `unipelt.from_pretrained`, rebuild the run's GLUE data
module (task, K, split seed, dev size, sequence length from the run's summary.json and config.yaml),
calibrate every gate on the run's dev split (`unipelt.calibrate_gates`; never the test split), merge
with those gates (`unipelt.merge(model, gates=...)`: LoRA folded, adapter/prefix kept with constant
gates), then score both models on the test split (GLUE dev) and time inference over it: eval forward
under ``torch.inference_mode``, wall clock, ``--threads`` threads, rounds interleaved (order alternates)
and medians reported. Writes `<out>/<task>_seed<S>.json` per run and `<out>/report.md` (every JSON in
`<out>`, grouped by task: mean ± std over seeds).

    python benchmarks/fixed_gates.py runs/fixed_gates/sst2/seed0 runs/fixed_gates/rte/seed0 \
        --out results/minilm_k100_fixed_gates --data-dir ../shared/glue
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, no install
import unipelt  # noqa: E402
from datamodules import GLUEDataModule  # noqa: E402
from unipelt.io import read_config, resolve_local  # noqa: E402

CLOCK = time.perf_counter


def repo_relative(path: str | Path) -> str:
    """A path as the report shows it: relative to the repository (or to the working directory)."""
    resolved = Path(path).resolve()
    for base in (ROOT, Path.cwd()):
        try:
            return str(resolved.relative_to(base))
        except ValueError:
            continue
    return str(path)


def run_config(run: Path) -> dict:
    """The `data` section of the run's own config.yaml (the one Lightning wrote for this fit)."""
    configs = sorted(run.glob("lightning_logs/version_*/config.yaml"))
    if not configs:
        raise SystemExit(f"error: {repo_relative(run)}: no lightning_logs/version_*/config.yaml (not a fit run?)")
    return yaml.safe_load(configs[-1].read_text())["data"]


def load_model(run: Path, summary: dict) -> torch.nn.Module:
    """The exported model on its backbone (a `pkg:` backbone resolved the way the run resolved it)."""
    from transformers import AutoModelForSequenceClassification

    backbone = read_config(run / "export")["backbone"]
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_local(summary["model_name_or_path"]), num_labels=backbone["num_labels"])
    return unipelt.from_pretrained(run / "export", model=base)


def forward_all(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches])


def measure(run: Path, rounds: int, data_dir: str | None) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    data = run_config(run)
    dm = GLUEDataModule(task=summary["task"], model_name_or_path=summary["model_name_or_path"],
                        data_dir=data_dir or data["data_dir"], k_shot=summary["k_shot"], seed=summary["data_seed"],
                        dev_size=data["dev_size"], max_seq_length=data["max_seq_length"],
                        batch_size=data["batch_size"], eval_batch_size=data.get("eval_batch_size", 64))
    dm.setup()
    model = load_model(run, summary)
    gates = unipelt.calibrate_gates(model, dm.val_dataloader())  # the run's dev split, never test
    fixed = unipelt.merge(model, gates=gates).eval()

    test = list(dm.test_dataloader())  # collated once: the timing is the models', not the collator's
    labels = torch.cat([b["labels"] for b in test])
    models = {"gated": model, "fixed": fixed}
    times: dict[str, list[float]] = {name: [] for name in models}
    logits: dict[str, torch.Tensor] = {}
    forward_all(model, test[:1]), forward_all(fixed, test[:1])  # warm-up, not timed
    for r in range(rounds):
        for name in (("gated", "fixed") if r % 2 == 0 else ("fixed", "gated")):
            start = CLOCK()
            out = forward_all(models[name], test)
            times[name].append(CLOCK() - start)
            logits.setdefault(name, out)
    pred = {name: out.argmax(-1) for name, out in logits.items()}
    acc = {name: float((p == labels).double().mean()) for name, p in pred.items()}
    gated_s, fixed_s = statistics.median(times["gated"]), statistics.median(times["fixed"])
    return {
        "run": repo_relative(run),
        "backbone": summary["model_name_or_path"],
        "task": summary["task"], "k_shot": summary["k_shot"], "method": summary["method"],
        "data_seed": summary["data_seed"], "seed": summary["seed"], "epochs": summary["epochs"],
        "dev_size": data["dev_size"], "calibration": f"dev split ({data['dev_size']} rows)",
        "test_examples": int(labels.numel()),
        "run_test_accuracy": summary["test"].get("test/accuracy"),  # the fit's own figure: reload check
        "gated_accuracy": acc["gated"], "fixed_accuracy": acc["fixed"],
        "accuracy_difference": acc["fixed"] - acc["gated"],
        "prediction_agreement": float((pred["gated"] == pred["fixed"]).double().mean()),
        "max_abs_logit_difference": float((logits["gated"] - logits["fixed"]).abs().max()),
        "gates": gates,
        "threads": torch.get_num_threads(), "rounds": rounds,
        "gated_time_s": gated_s, "fixed_time_s": fixed_s, "time_ratio_fixed_over_gated": fixed_s / gated_s,
        "gated_times_s": times["gated"], "fixed_times_s": times["fixed"],
        "load_average_1min": os.getloadavg()[0],
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(out: Path, header: str) -> str:
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*_seed*.json"))]
    lines = [header, "",
             "| task | runs (seeds) | gated acc | fixed-gate acc | fixed - gated | prediction agreement "
             "| time fixed / gated | gated s | fixed s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in rows}):
        rs = [r for r in rows if r["task"] == task]
        col = {k: [r[k] for r in rs] for k in rs[0] if isinstance(rs[0][k], int | float)}
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(
            f"| {task} | {len(rs)} ({seeds}) | {mean_std(col['gated_accuracy'])} | {mean_std(col['fixed_accuracy'])} "
            f"| {mean_std(col['accuracy_difference'])} | {mean_std(col['prediction_agreement'])} "
            f"| {mean_std(col['time_ratio_fixed_over_gated'])} | {mean_std(col['gated_time_s'])} "
            f"| {mean_std(col['fixed_time_s'])} |")
    lines += ["", "Per run:", "", "| run | test n | fit's test acc | gated acc | fixed acc | agreement | max |Δlogit| "
              "| time ratio | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['test_examples']} | {r['run_test_accuracy']:.4f} | {r['gated_accuracy']:.4f} "
                     f"| {r['fixed_accuracy']:.4f} | {r['prediction_agreement']:.4f} "
                     f"| {r['max_abs_logit_difference']:.3f} | {r['time_ratio_fixed_over_gated']:.3f} "
                     f"| {r['load_average_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `cli.py fit` run folders (with export/)")
    parser.add_argument("--out", type=Path, default=Path("results/minilm_k100_fixed_gates"))
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: the run's data.data_dir)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--header", default="", help="markdown put above the table (settings of the runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        if not (run / "summary.json").is_file() or not (run / "export").is_dir():
            raise SystemExit(f"error: {repo_relative(run)}: not a finished fit run (needs summary.json and export/)")
        result = measure(run, args.rounds, args.data_dir)
        name = f"{result['task']}_seed{result['seed']}.json"
        (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
        print(f"{result['run']}: gated {result['gated_accuracy']:.4f} fixed {result['fixed_accuracy']:.4f} "
              f"time ratio {result['time_ratio_fixed_over_gated']:.3f}", flush=True)
    (args.out / "report.md").write_text(report(args.out, args.header))
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
