"""Runs inside the kvpress virtual environment (see vs_kvpress.py); reads job.json, writes job.out.jsonl.

Mirrors kvpress 0.5.5's pipeline: ``with press(model): model.model(context)``, then the question with position ids
continuing from the uncompressed context length, then greedy decoding (``generate_answer``). Imports nothing from
kvsieve: it must run on transformers 5.2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, DynamicCache


@torch.no_grad()
def answer(model, cache, question_ids, context_length, max_new_tokens, eos):
    position_ids = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
    outputs = model(input_ids=question_ids, past_key_values=cache, position_ids=position_ids, logits_to_keep=1)
    position_ids = position_ids[:, -1:] + 1
    out = []
    token = int(outputs.logits[0, -1].argmax())
    for i in range(max_new_tokens):
        if token in eos:
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
        outputs = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=position_ids + i)
        token = int(outputs.logits[0, -1].argmax())
    return out


def main() -> None:
    job_path = Path(sys.argv[1])
    job = json.loads(job_path.read_text())
    torch.set_num_threads(job["threads"])
    models = {}
    for impl in ("sdpa", "eager"):
        models[impl] = AutoModelForCausalLM.from_pretrained(
            job["model_dir"], dtype=torch.float32, attn_implementation=impl, local_files_only=True
        ).eval()
    rows = []
    for s in job["samples"]:
        context = torch.tensor([s["context_ids"]])
        question = torch.tensor([s["question_ids"]])
        for method, press_name in job["presses"].items():
            model = models["eager" if press_name == "ObservedAttentionPress" else "sdpa"]
            for ratio in job["ratios"]:
                press = getattr(kvpress, press_name)(compression_ratio=ratio)
                cache = DynamicCache()
                t0 = time.perf_counter()
                with press(model), torch.no_grad():
                    model.model(input_ids=context, past_key_values=cache)
                seconds = time.perf_counter() - t0
                out = answer(model, cache, question, context.shape[1], s["max_new_tokens"], set(s["eos"]))
                rows.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "sample": s["id"],
                        "prediction_ids": out,
                        "prefill_seconds": seconds,
                        "kv_tokens": cache.get_seq_length(),
                    }
                )
    job_path.with_name("job.out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
