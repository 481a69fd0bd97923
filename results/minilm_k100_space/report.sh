#!/usr/bin/env bash
# The design space's paired report (report.md, report_*.csv here): this grid's runs (the six new presets and
# UniPELT (APL)) beside results/minilm_k100_head's fine-tuning, adapter, prefix, LoRA and UniPELT (AP) on SST-2
# and STS-B: the same backbone, settings, K and seeds, so they pair seed for seed. It reads the committed
# metrics.json files from a temporary copy (metrics.json files only); run it from anywhere, with unipelt installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/minilm_k100_space
HEAD=results/minilm_k100_head/grid
both=$(mktemp -d)
trap 'rm -rf "$both"' EXIT
for task in sst2 stsb; do
  mkdir -p "$both/$task/k100"
  for method in finetune adapter prefix lora unipelt_ap; do cp -r "$HEAD/$task/k100/$method" "$both/$task/k100/"; done
  for run in "$R"/grid/"$task"/k100/*; do cp -r "$run" "$both/$task/k100/"; done
done
python cli.py report "$both" --out "$R/report.md" --data-dir ../shared/glue
