"""STS-B head diagnosis, step 2: per finished run, the dev curve and the test score of the last checkpoint.

For every ``<out>/<head>/stsb/k100/<method>/seed<s>`` whose ``metrics.json`` says done (the grid tested the
best dev checkpoint), reads the dev curve from the run's ``lightning_logs/*/metrics.csv``, tests
``checkpoints/last.ckpt`` (the weights at the end of training) on the same test split, and writes
``diagnosis.json`` beside ``metrics.json`` (committed; a run that has one is skipped: resumable). Then
writes ``<out>/../diagnose.md`` and ``diagnose.json``: one row per head x method.

    python results/minilm_k100_head/diagnose.py results/minilm_k100_head/diagnose
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import yaml

METRIC = "spearman"


def dev_curve(run: Path) -> list[dict]:
    rows = []
    for path in sorted(run.glob("lightning_logs/*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get(f"val/{METRIC}"):
                    rows.append({"epoch": int(row["epoch"]), "step": int(row["step"]),
                                 f"val_{METRIC}": float(row[f"val/{METRIC}"])})
    return rows


def test_checkpoint(record: dict, ckpt: Path) -> dict[str, float]:
    """Test ``ckpt`` with the run's own resolved config (same data split, same test set)."""
    from cli import build_cli

    config = yaml.safe_load(record["config"])
    for key in ("optimizer", "lr_scheduler", "ckpt_path", "weights_only"):
        config.pop(key, None)
    config["trainer"].update(logger=False, enable_progress_bar=False)
    with tempfile.TemporaryDirectory() as tmp:
        config["trainer"]["default_root_dir"] = tmp
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        cli = build_cli(["--config", str(path)], run=False)
        results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), verbose=False)
    return {k: float(v) for r in results for k, v in r.items() if not k.endswith("/loss")}


def diagnose(run: Path) -> dict | None:
    record = json.loads((run / "metrics.json").read_text())
    if record.get("status") != "done":
        return None
    out = run / "diagnosis.json"
    if out.exists():
        return json.loads(out.read_text())
    last = sorted(run.glob("checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    curve = dev_curve(run)
    if not last or not curve:
        print(f"{run}: no last checkpoint or no metrics.csv here (run on another machine?); skipped",
              file=sys.stderr)
        return None
    best = max(curve, key=lambda r: r[f"val_{METRIC}"])
    result = {
        "head": record.get("head") or yaml.safe_load(record["config"])["model"].get("head") or "pooler",
        "method": record["method"], "seed": record["seed"], "learning_rate": record["learning_rate"],
        "dev_curve": curve,
        "best_dev": record["best_val"]["value"], "best_epoch": best["epoch"],
        "last_dev": curve[-1][f"val_{METRIC}"], "last_epoch": curve[-1]["epoch"],
        "test_best": record["test"][f"test/{METRIC}"],
        "test_last": test_checkpoint(record, last[-1])[f"test/{METRIC}"],
        "trainable_params": record["trainable_params"],
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(rows: list[dict]) -> str:
    lines = ["| head | method | lr | best dev (epoch) | last dev (epoch) | test @best | test @last | "
             "dev curve (every eval) |", "|" + "---|" * 8]
    for r in rows:
        curve = " ".join(f"{p[f'val_{METRIC}']:.2f}" for p in r["dev_curve"])
        lines.append(f"| {r['head']} | {r['method']} | {r['learning_rate']:g} | {r['best_dev']:.3f} "
                     f"({r['best_epoch']}) | {r['last_dev']:.3f} ({r['last_epoch']}) | "
                     f"{100 * r['test_best']:.1f} | {100 * r['test_last']:.1f} | {curve} |")
    return "\n".join(lines) + "\n"


def main(out: Path) -> None:
    rows = [r for run in sorted(out.glob("*/stsb/k100/*/seed*")) if (run / "metrics.json").exists()
            and (r := diagnose(run)) is not None]
    rows.sort(key=lambda r: (r["head"], r["method"], r["seed"]))
    (out.parent / "diagnose.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out.parent / "diagnose.md").write_text(
        "# STS-B K=100, all-MiniLM-L6-v2: heads x methods (Spearman x100 on test; dev on the 1000-row "
        "dev split)\n\n" + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/minilm_k100_head/diagnose"))
