#!/usr/bin/env bash
# The speed figures of docs/benchmarks.md and docs/decoders.md in one go, on an otherwise idle machine
# (stop grids first: every other process on the 2 cores skews the ratios). About 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
uptime
python benchmarks/step_time.py --models minilm bert-base --presets finetune unipelt_apl --rounds 5 --threads 2
uptime
python benchmarks/decoder_step.py --threads 2 --rounds 3
uptime
