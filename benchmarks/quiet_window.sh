#!/usr/bin/env bash
# The speed figures of the README, docs/method.md and docs/decoders.md in one go, on an otherwise idle
# machine (stop grids first: every other process on the 2 cores skews the ratios). ~10 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
uptime
echo "## cli.py fit --help: rendered (no kept text), then kept"
export XDG_CACHE_HOME=$(mktemp -d)
for i in 1 2; do /usr/bin/time -f "rendered %e s" python cli.py fit --help > /dev/null; done
for i in 1 2 3; do /usr/bin/time -f "kept %e s" python cli.py fit --help > /dev/null; done
rm -rf "$XDG_CACHE_HOME"; unset XDG_CACHE_HOME
python benchmarks/step_time.py --models minilm bert-base --presets finetune unipelt_apl --rounds 7 --threads 2
uptime
python benchmarks/decoder_step.py --threads 2 --rounds 3
uptime
python benchmarks/step_time.py --models distilbert-base electra-base deberta-v3-base modernbert-base \
  --presets finetune unipelt_apl --rounds 3 --length 64 --threads 2
uptime
