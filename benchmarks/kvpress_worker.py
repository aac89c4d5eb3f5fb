"""Runs inside the kvpress virtual environment (see vs_kvpress.py); reads a job file, appends one line per row to the
file the job names (``out``) as each row finishes, so a run cut short keeps what it measured.

Mirrors kvpress 0.5.5's pipeline: ``with press(model): model.model(prefix)``, then the follow-up ids with position ids
continuing from the uncompressed prefix length, then greedy decoding (``generate_answer``). Where the press left layers
of different lengths (PyramidKV, SimLayerKV), the follow-up ids go one at a time: transformers 5.2 builds a multi-token
causal mask from layer 0's length, which breaks the other layers (kvpress's own pipeline fails there on sdpa).
Each row names its press as a Python expression over kvpress's namespace, e.g.
``AdaKVPress(SnapKVPress(compression_ratio=0.5))``; a press that fails is recorded as an error and the others still
run. Imports nothing from kvsieve: it must run on transformers 5.2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = {name: getattr(kvpress, name) for name in dir(kvpress) if name.endswith("Press")}


def uneven(cache: DynamicCache) -> bool:
    """Whether the press left layers of different lengths (PyramidKV, SimLayerKV, per-layer ratios)."""
    return len({layer.keys.shape[-2] for layer in cache.layers}) > 1


@torch.no_grad()
def answer(model, cache, question_ids, context_length, max_new_tokens, eos):
    position_ids = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
    if uneven(cache):  # transformers builds one causal mask from layer 0's length: feed the question token by token
        for i in range(question_ids.shape[1]):
            outputs = model(
                input_ids=question_ids[:, i : i + 1], past_key_values=cache, position_ids=position_ids[:, i : i + 1]
            )
    else:
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


def kept_share(press) -> float | None:
    """1 - the press's compression ratio (DMSPress measures it after the pass); None where it has none."""
    ratio = getattr(press, "compression_ratio", None)
    return 1.0 - float(ratio) if isinstance(ratio, int | float) else None


def run_row(models, item, row) -> dict:
    prefix = torch.tensor([item["prefix_ids"]])
    follow = torch.tensor([item["follow_ids"]])
    press = eval(row["press"], {"__builtins__": {"list": list}}, PRESSES)  # the job file is ours (vs_kvpress.py)
    model = models["eager" if "ObservedAttentionPress" in row["press"] else "sdpa"]
    cache = DynamicCache()
    t0 = time.perf_counter()
    with press(model), torch.no_grad():
        model.model(input_ids=prefix, past_key_values=cache)
    seconds = time.perf_counter() - t0
    out = answer(model, cache, follow, prefix.shape[1], item["max_new_tokens"], set(item["eos"]))
    return {"prediction_ids": out, "prefill_seconds": seconds, "kept": kept_share(press)}


def main() -> None:
    job_path = Path(sys.argv[1])
    job = json.loads(job_path.read_text())
    torch.set_num_threads(job["threads"])
    models = {}
    for impl in ("sdpa", "eager"):
        models[impl] = AutoModelForCausalLM.from_pretrained(
            job["model_dir"], dtype=torch.float32, attn_implementation=impl, local_files_only=True
        ).eval()
    with open(job["out"], "a") as out:
        for row in job["rows"]:
            try:
                result = run_row(models, job["items"][row["item"]], row)
            except Exception as err:  # reported in the table; the others still run
                result = {"error": f"{type(err).__name__}: {err}"[:120]}
            out.write(json.dumps({**row, **result}) + "\n")
            out.flush()
            status = "error" if "error" in result else "ok"
            print(f"kvpress {row['label']} {row['item']} {row['ratio']}: {status}", flush=True)


if __name__ == "__main__":
    main()
