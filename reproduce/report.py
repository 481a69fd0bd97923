"""The reproduction report: our grid beside the paper's Tables 1, 2 and 4, as markdown and CSV.

Scores are the paper's metric per task (CoLA Matthews, MRPC/QQP F1, STS-B Spearman, MNLI
matched accuracy, otherwise accuracy) x 100, mean and sample std over finished seeds. A cell is
complete when every seed any runner planned for it has finished. Table 2 pairs UniPELT with the best
single method seed by seed (``reproduce/paired.py``). See docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import paper
from .grid import group_options
from .paired import CONFIDENCE, paired_rows, verdict
from .results import Cell, Key, aggregate, backbone_name, load_planned, load_records, run_id
from .tasks import DESIGN_SPACE, METHODS, TASKS, k_tag, paper_setting

Baselines = Mapping[str, float | None] | Callable[[str], float | None]


@dataclass
class Report:
    """All tables of one report, as rows of plain values (the CSV) before rendering."""

    table1: list[dict]
    table2: list[dict]
    efficiency: list[dict]
    records: list[dict]


def _ks(cells: Mapping[Key, Cell]) -> list[str]:
    ks = {k for k, _, _ in cells}
    return sorted(ks, key=lambda k: (k == "full", int(k) if k != "full" else 0))


def _tasks(cells: Mapping[Key, Cell], k: str) -> list[str]:
    present = {t for kk, t, _ in cells if kk == k}
    return [t for t in TASKS if t in present]


def _methods(cells: Mapping[Key, Cell], k: str) -> list[str]:
    present = {m for kk, _, m in cells if kk == k}
    return [m for m in METHODS if m in present]


def _fmean(xs: Sequence[float | None]) -> float | None:
    return None if not xs or any(x is None for x in xs) else statistics.fmean(xs)


def _paper_avg(setting: str, method: str, tasks: Sequence[str]) -> float | None:
    """The paper's average over ``tasks``: its published Avg when all 8 tasks are there."""
    if len(tasks) == len(TASKS):
        return paper.score(setting, METHODS[method], "Avg")
    return _fmean([paper.score(setting, METHODS[method], TASKS[t].paper_name) for t in tasks])


def table1_rows(cells: Mapping[Key, Cell], baselines: Baselines | None = None) -> list[dict]:
    """One row per (K, method, task or Avg), plus the majority baseline per (K, task); a cell
    without a score carries ``why``."""
    rows = []
    for k in _ks(cells):
        setting, tasks = paper_setting(k), _tasks(cells, k)
        for method in _methods(cells, k):
            means = []
            for task in tasks:
                c = cells.get((k, task, method), Cell())
                p = paper.score(setting, METHODS[method], TASKS[task].paper_name)
                row = _row(k, method, task, c.mean, c.std, c.n, len(c.planned), c.complete, p)
                rows.append(row | {"why": None if c.n else c.why_empty()})
                means.append(c.mean)
            complete = all(cells.get((k, t, method), Cell()).complete for t in tasks)
            n = min(cells.get((k, t, method), Cell()).n for t in tasks)
            row = _row(k, method, "Avg", _fmean(means), None, n, None, complete, _paper_avg(setting, method, tasks))
            missing = [TASKS[t].paper_name for t, m in zip(tasks, means, strict=True) if m is None]
            rows.append(row | {"why": "no score on " + ", ".join(missing) if missing else None})
        if baselines is not None:
            get = baselines if callable(baselines) else baselines.get
            for task in tasks:
                value = get(task)
                if value is not None:
                    why = None
                elif TASKS[task].info.is_regression:
                    why = "a constant prediction has no correlation"
                else:
                    why = "no GLUE files for this task in --data-dir"
                rows.append(_row(k, "majority", task, value, None, None, None, True, None) | {"why": why})
    return rows


def _row(k, method, task, mean, std, n, planned, complete, paper_value) -> dict:
    diff = None if mean is None or paper_value is None else mean - paper_value
    return {
        "k": k,
        "method": method,
        "paper_method": METHODS.get(method, "majority class"),
        "task": task,
        "metric": TASKS[task].metric_label if task in TASKS else "avg",
        "mean": mean,
        "std": std,
        "n_seeds": n,
        "n_planned": planned,
        "complete": complete,
        "paper": paper_value,
        "diff": diff,
    }


def efficiency_rows(records: list[dict]) -> list[dict]:
    """Paper Table 4 from the runs: params, train time/epoch and inference time vs fine-tuning.

    Times are compared within the same (K, task) and averaged over those pairs, so a method run
    on more tasks than fine-tuning is not favoured by the tasks' different lengths.
    """
    by: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("status") == "done":
            k, task, method, _ = run_id(r)
            by[(k, task, method)].append(r)

    def mean_of(rs, f):
        vals = [v for v in map(f, rs) if v is not None]
        return statistics.fmean(vals) if vals else None

    def per_example(r):
        n = r.get("test_examples")
        return r["test_time_s"] / n if n and r.get("test_time_s") is not None else None

    rows = []
    for method in [m for m in METHODS if any(key[2] == m for key in by)]:
        rs = [r for key, v in by.items() if key[2] == method for r in v]
        train_ratio, infer_ratio = [], []
        for (k, task, m), v in by.items():
            ft = by.get((k, task, "finetune"))
            if m != method or not ft:
                continue
            for f, acc in (
                (lambda r: r.get("train_time_per_epoch_s"), train_ratio),
                (per_example, infer_ratio),
            ):
                a, b = mean_of(v, f), mean_of(ft, f)
                if a is not None and b:
                    acc.append(a / b)
        p = paper.table4().get(METHODS[method], {})
        rows.append(
            {
                "method": method,
                "paper_method": METHODS[method],
                "trainable_params": statistics.median(r["trainable_params"] for r in rs),
                "trainable_pct": statistics.median(_trainable_pct(r) for r in rs),
                "train_time_pct": 100 * statistics.fmean(train_ratio) if train_ratio else None,
                "inference_time_pct": 100 * statistics.fmean(infer_ratio) if infer_ratio else None,
                "paper_trainable_params": p.get("trainable_params"),
                "paper_trainable_pct": p.get("trainable_pct"),
                "paper_train_time_pct": p.get("train_time_pct"),
                "paper_inference_time_pct": p.get("inference_time_pct"),
                "runs": len(rs),
            }
        )
    return rows


class RunsTwice(ValueError):
    """The folder holds some run more than once (several grids, or a sweep beside its grid)."""


def build(root: Path, baselines: Baselines | None = None) -> Report:
    records = load_records(root)
    seen: dict[tuple[str, str, str, int], str] = {}
    for rec in records:
        where = seen.setdefault(run_id(rec), str(Path(rec["_path"]).parent.relative_to(root)))
        if where != str(Path(rec["_path"]).parent.relative_to(root)):
            k, task, method, seed = run_id(rec)
            raise RunsTwice(f"{root} holds {task} K={k} {method} seed {seed} twice ({where} and "
                            f"{Path(rec['_path']).parent.relative_to(root)}): pass one grid folder")
    cells = aggregate(records, load_planned(root))
    table2 = paired_rows(cells, _ks(cells), lambda k: _tasks(cells, k))
    return Report(table1_rows(cells, baselines), table2, efficiency_rows(records), records)


# ---------------------------------------------------------------- rendering


def _f(x: float | None, nd: int = 1, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _trainable_pct(record: dict) -> float:
    """The run's own figure (the summary's: trainable / the pretrained backbone alone); records written
    before summaries carried it fall back to trainable / all parameters."""
    if record.get("trainable_pct") is not None:
        return float(record["trainable_pct"])
    return 100 * record["trainable_params"] / (record.get("backbone_params") or record["total_params"])


def _params(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{1 if n < 100 * div else 0}f}{unit}"
    return f"{n:.0f}"


def _cell(r: dict) -> str:
    """``mean ± std *n/N* (paper, diff)``; ± only from two seeds up; an empty cell says why."""
    if r["mean"] is None:
        return f"– ({r['why']})" if r.get("why") else "–"
    if r["method"] == "majority":
        return _f(r["mean"])
    ours = _f(r["mean"]) if r["std"] is None else f"{_f(r['mean'])} ± {_f(r['std'])}"
    if r["n_planned"] is not None and not r["complete"]:
        ours += f" *{r['n_seeds']}/{r['n_planned']}*"
    elif r["task"] == "Avg" and not r["complete"]:
        ours += " *incomplete*"
    if r["paper"] is None:
        return ours
    return f"{ours} ({_f(r['paper'], 2)}, {_f(r['diff'], sign=True)})"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def to_markdown(rep: Report, title: str = "UniPELT reproduction") -> str:
    out = [f"# {title}", "", *_setup(rep.records), ""]
    out += [
        "## Table 1: GLUE dev (the paper's test set)",
        "",
        "Cell: ours mean ± std over seeds (paper, ours − paper); no ± where one seed finished. *n/N*: "
        "only n of N planned seeds finished. Avg is over the tasks in the table (the paper's column "
        "recomputed on the same tasks). Metrics ×100: "
        + ", ".join(f"{t.paper_name} {t.metric_label}" for t in TASKS.values())
        + ".",
        "",
    ]
    for k in dict.fromkeys(r["k"] for r in rep.table1):
        rows = [r for r in rep.table1 if r["k"] == k]
        cols = list(dict.fromkeys(r["task"] for r in rows if r["method"] != "majority")) or list(
            dict.fromkeys(r["task"] for r in rows)
        )
        grid = defaultdict(dict)
        for r in rows:
            grid[r["method"]][r["task"]] = _cell(r)
        header = ["K=" + k if k != "full" else "full data"] + [
            TASKS[c].paper_name if c in TASKS else c for c in cols
        ]
        unpublished = {r["method"] for r in rows if r["method"] != "majority"} - {
            r["method"] for r in rows if r["paper"] is not None
        }
        setting = "K=" + k if k != "full" else "full data"
        body = [
            [METHODS.get(m, "Majority class") + (f" (not in the paper at {setting})" if m in unpublished else "")]
            + [grid[m].get(c, "– (not averaged)" if m == "majority" else "–") for c in cols]
            for m in grid
        ]
        out += [f"### {'K = ' + k if k != 'full' else 'Full data'}", "", *_md_table(header, body), ""]
    out += _table2_markdown(rep)
    if rep.efficiency:
        out += [
            "## Table 4: efficiency relative to fine-tuning",
            "",
            "Ours: median trainable parameters over runs; train time per epoch and inference time "
            "per test example as a percentage of fine-tuning on the same task and K (mean over "
            "those pairs). Paper: BERT-base.",
            "",
        ]
        header = [
            "method",
            "trainable params",
            "paper",
            "train time",
            "paper",
            "inference time",
            "paper",
            "runs",
        ]
        body = [
            [
                r["paper_method"],
                f"{_params(r['trainable_params'])} ({r['trainable_pct']:.2f}%)",
                f"{_params(r['paper_trainable_params'])} ({_f(r['paper_trainable_pct'], 2)}%)"
                if r["paper_trainable_params"]
                else "– (not in the paper)",
                _pct(r["train_time_pct"], "no fine-tuning timing on the same task and K"),
                _pct(r["paper_train_time_pct"], "not in the paper"),
                _pct(r["inference_time_pct"], "no fine-tuning timing on the same task and K"),
                _pct(r["paper_inference_time_pct"], "not in the paper"),
                str(r["runs"]),
            ]
            for r in rep.efficiency
        ]
        out += [*_md_table(header, body), ""]
    failed = [r for r in rep.records if r.get("status") != "done"]
    if failed:
        out += ["## Failed runs", ""]
        out += [f"- `{_run_name(r)}`: {r.get('error', 'failed')}" for r in failed]
        out += [""]
    return "\n".join(out)


def _table2_markdown(rep: Report) -> list[str]:
    if not rep.table2:
        return []
    out = [
        "## Table 2: UniPELT against the best single method, paired by seed",
        "",
        "Gain = UniPELT − the other method at the same seed (same few-shot split, same training seed), "
        f"mean over seeds with a {CONFIDENCE:.0%} Student-t interval over seeds. The best single method is "
        "chosen per task on its mean *dev* score (the checkpoint-selection metric), never on test; the "
        "task average pairs per seed too. Paper gain: UniPELT − the best of the paper's reported scores "
        "(its Table 2 for the 8-task average). Best of A, P, L: of Adapter, Prefix-tuning, LoRA, the "
        "methods UniPELT combines. The NoGate rows compare UniPELT with its ungated ablation.",
        "",
    ]
    if any(r["method"] in DESIGN_SPACE for r in rep.table2):
        out[-1:-1] = [
            "",
            "The design space's rows (issue 28) pair each new method with UniPELT (APL), and each new single "
            "method with the best of A, P, L: gain = the new method − the other; they judge no paper claim.",
        ]
    header = ["K", "comparison", "task", "vs (chosen on dev)", "seeds", "gain", "95% CI", "paper gain", "note"]
    body = [
        [
            r["k"],
            r["comparison"],
            TASKS[r["task"]].paper_name if r["task"] in TASKS else "Avg",
            _versus(r["versus"]) if r["task"] != "Avg" else "per task, as above",
            str(r["n_seeds"]),
            _f(r["gain_mean"], sign=True),
            "–" if r["ci_low"] is None else f"[{_f(r['ci_low'], sign=True)}, {_f(r['ci_high'], sign=True)}]",
            _f(r["paper_gain"], 2, sign=True) if r["paper_gain"] is not None else "– (not in the paper)",
            r["note"] or "",
        ]
        for r in rep.table2
    ]
    out += [*_md_table(header, body), ""]
    backbone = ", ".join(_backbones(rep.records)) or "this backbone"
    out += [f"- {verdict(r, backbone)}" for r in rep.table2 if r["task"] == "Avg"]
    return [*out, ""]


def _versus(methods: str | None) -> str:
    if not methods:
        return "–"
    return "/".join(METHODS.get(m, m) for m in methods.split("/"))


def _backbones(records: list[dict]) -> list[str]:
    done = [r for r in records if r.get("status") == "done" and r.get("model_name_or_path")]
    return sorted({backbone_name(r["model_name_or_path"]) for r in done})


def _run_name(rec: dict) -> str:
    k, task, method, seed = run_id(rec)
    return f"{task}/{k_tag(k)}/{method}/seed{seed}"


def _pct(x: float | None, why: str) -> str:
    return f"– ({why})" if x is None else f"{x:.0f}%"


def _setup(records: list[dict]) -> list[str]:
    """What the numbers were measured with: backbone, hardware, runs, wall time, extra CLI args."""
    done = [r for r in records if r.get("status") == "done"]
    if not records:
        return ["No runs found."]
    hosts = sorted(
        {
            f"{h.get('machine')} {h.get('cpus')} CPUs" + (f", GPU {r['device']}" if r.get("device") else "")
            for r in records
            if (h := r.get("host"))
        }
    )
    wall = sum(r.get("wall_time_s", 0) for r in records)
    lines = [
        f"- Runs: {len(done)} done, {len(records) - len(done)} failed.",
        f"- Backbone: {', '.join(_backbones(records)) or 'not recorded'}.",
        f"- Hardware: {'; '.join(hosts) or 'unknown'}.",
        f"- Wall time summed over runs: {wall / 3600:.2f} h.",
    ]
    args, epochs = defaultdict(set), defaultdict(list)
    rates: defaultdict[str, defaultdict[float, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in done:
        cmd = r.get("command") or []
        if "--trainer.default_root_dir" in cmd:  # what follows are the grid's extra / per-method args
            options = group_options(cmd[cmd.index("--trainer.default_root_dir") + 2 :])
            # The rate is reported as the run used it (below); stacked per-task overrides would mislead.
            args[r["method"]].add(tuple(o for o in options if not o.startswith("--model.learning_rate ")))
        if r.get("epochs") is not None:
            epochs[r["method"]].append(r["epochs"])
        if r.get("learning_rate") is not None:
            rates[r["method"]][r["learning_rate"]].add(r["task"])
    every = [set(o) for options in args.values() for o in options]
    common = set.intersection(*every) if every else set()
    if common:
        first = next(o for options in args.values() for o in options)
        lines.append("- Arguments of every run: `" + " ".join(o for o in first if o in common) + "`.")
    settings = _saved_settings(done)
    if settings:
        lines.append(f"- Settings from the runs' saved configs: {settings}.")
    for m in (m for m in METHODS if m in args or m in epochs or m in rates):
        e = epochs[m]
        ep = f"epochs run {min(e)}-{max(e)} (mean {statistics.fmean(e):.1f})" if e else ""
        own = sorted(" ".join(o for o in options if o not in common) for options in args[m])
        lr = _rates_by_task(rates[m])
        lines.append(f"- {METHODS[m]}: " + "; ".join(x for x in [lr, *(f"`{a}`" for a in own if a), ep] if x))
    return lines


# The training settings a reader needs beside the command-line arguments (the rest is in each run's config).
SETTINGS = (
    "data.batch_size",
    "data.max_seq_length",
    "data.dev_size",
    "model.weight_decay",
    "model.warmup_ratio",
    "model.pelt_overrides",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
)


def _saved_settings(records: list[dict]) -> str:
    """``batch_size 16, max_seq_length 128, ...`` from the saved configs; a setting that differs says so."""
    values: defaultdict[str, set[str]] = defaultdict(set)
    for r in records:
        try:
            cfg = yaml.safe_load(r.get("config") or "") or {}
        except yaml.YAMLError:
            continue
        for key in SETTINGS:
            section, name = key.split(".")
            if isinstance(cfg.get(section), dict) and name in cfg[section]:
                values[key].add(str(cfg[section][name]))
    shown = []
    for key in SETTINGS:
        if key in values:
            v = sorted(values[key])
            shown.append(f"{key.split('.')[1]} " + (v[0] if len(v) == 1 else f"varies ({', '.join(v)})"))
    return ", ".join(shown)


def _rates_by_task(rates: Mapping[float, set[str]]) -> str:
    """``{2e-4: {rte, mrpc}, 6e-5: {stsb}}`` -> "learning rate 0.0002 (MRPC, RTE), 6e-05 (STS-B)"."""
    if not rates:
        return ""
    if len(rates) == 1:
        return f"learning rate {next(iter(rates)):g}"

    def names(tasks: set[str]) -> str:
        return ", ".join(sorted(TASKS[t].paper_name if t in TASKS else t for t in tasks))

    by_use = sorted(rates.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return "learning rate " + ", ".join(f"{lr:g} ({names(tasks)})" for lr, tasks in by_use)


def write_csvs(rep: Report, stem: Path) -> list[Path]:
    paths = []
    for name, rows in (("table1", rep.table1), ("table2", rep.table2), ("efficiency", rep.efficiency)):
        if not rows:
            continue
        path = stem.with_name(f"{stem.stem}_{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        paths.append(path)
    return paths


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="unipelt report", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="grid folder written by `unipelt reproduce`")
    p.add_argument("--out", type=Path, help="markdown file (default: <root>/report.md); CSVs beside it")
    p.add_argument("--data-dir", type=Path, help="GLUE folder: adds the majority-class baseline row")
    p.add_argument("--gates", action="store_true", help="also write gate heatmaps (needs matplotlib)")
    p.add_argument(
        "--paired",
        action="store_true",
        help="Table 2 as gains paired by seed with 95%% intervals (always on; the flag is accepted for clarity)",
    )
    args = p.parse_args(list(argv))
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder; pass a grid folder written by `unipelt reproduce`", file=sys.stderr)
        return 2
    # A results folder keeps its grid in grid/ beside sweeps and diagnoses (results/minilm_k100_head): that grid.
    root = args.root / "grid" if (args.root / "grid").is_dir() else args.root
    baselines = None
    if args.data_dir:
        from datamodules import DataConfigError

        from .baseline import from_glue_dir

        try:
            baselines = from_glue_dir(args.data_dir, list(TASKS))
        except DataConfigError as err:
            print(f"error: --data-dir: {err}", file=sys.stderr)
            return 2
    try:
        rep = build(root, baselines)
    except RunsTwice as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.root / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = to_markdown(rep)
    if args.gates:
        from .gates import plot_gates

        try:
            pngs = plot_gates(rep.records, out.parent)
        except ImportError:
            text += "\n## Gates\n\nNot drawn: gate heatmaps need matplotlib (`pip install matplotlib`).\n"
            print("warning: --gates: no gate heatmaps without matplotlib (pip install matplotlib); "
                  "the tables are written", file=sys.stderr)
        else:
            text += "\n## Gates\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
            print(f"wrote {len(pngs)} gate heatmaps to {out.parent}")
    out.write_text(text)
    paths = write_csvs(rep, out)
    print(f"wrote {out} and {', '.join(map(str, paths))}")
    return 0
