#!/usr/bin/env bash
# Issue 29, the dev choices of multi-task UniPELT (README.md): short real runs on all-MiniLM-L6-v2, split and
# training seed 0, dev scores only (test is never read for a choice). 10 epochs (8 with the larger SST-2), dev
# (300 rows per task) every 2 epochs, no early stopping, UniPELT (APL) at its default rate 5e-4, cls_mlp heads.
#   gates:   SST-2 + CoLA + STS-B + RTE, K=100 each: a gate bank per task vs shared gates + a task embedding.
#   sampler: the same four tasks with SST-2 at K=400 (at K=100 each both rules draw the tasks uniformly):
#            proportional vs temperature sampling (T=2), with the gates chosen above (embedding).
# Two runs at a time, one thread each, nice 19. Resumable: a run with a summary.json is skipped, one with a
# checkpoints/last.ckpt goes on from it (its metrics then span lightning_logs/version_0, version_1...).
# Then: python results/minilm_k100_multitask/dev_choices.py > results/minilm_k100_multitask/dev_choices.md
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/minilm_k100_multitask/dev
COMMON=(--config configs/multitask_k100.yaml --data.data_dir ../shared/glue --data.dev_size 300
        --model.early_stopping_patience null --model.learning_rate 5e-4 --trainer.accelerator cpu
        --trainer.enable_progress_bar false --trainer.check_val_every_n_epoch 2)
TEN=(--trainer.min_epochs 10 --trainer.max_epochs 10)
EIGHT=(--trainer.min_epochs 8 --trainer.max_epochs 8 --data.tasks '[{task: sst2, k_shot: 400}, cola, stsb, rte]')
run() {  # run <name> <args...>; an unfinished run resumes from its last.ckpt (its log appended to)
  local out=$R/$1 resume=()
  [[ -f $out/summary.json ]] && return 0
  [[ -f $out/checkpoints/last.ckpt ]] && resume=(--ckpt_path "$out/checkpoints/last.ckpt")
  OMP_NUM_THREADS=1 nice -n 19 python cli.py fit "${COMMON[@]}" "${@:2}" --trainer.default_root_dir "$out" \
    --overwrite true "${resume[@]}" >> "$R/$1.log" 2>&1
  rm -f "$out"/checkpoints/*.ckpt "$out"/export/unipelt_model.safetensors
}
mkdir -p $R
run gates_bank "${TEN[@]}" --model.task_gates bank &
run gates_embedding "${TEN[@]}" --model.task_gates embedding &
wait
run sampler_proportional "${EIGHT[@]}" --model.task_gates embedding --data.sampling proportional &
run sampler_temperature "${EIGHT[@]}" --model.task_gates embedding --data.sampling temperature --data.temperature 2 &
wait
