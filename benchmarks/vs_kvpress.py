"""kvsieve vs kvpress 0.5.5, side by side, on the same samples, the same tokens and the same ratios.

Usage: python benchmarks/vs_kvpress.py [--samples 2] [--ratios 0.25,0.5,0.75] [--tasks ...] [--venv .venv-kvpress]

kvpress 0.5.5 requires transformers < 5.3, so it runs in its own virtual environment (made on first use, reused
after; about 70 s): torch 2.13.0, transformers 5.2.0, kvpress 0.5.5 and its dependencies. Both sides load the same
converted SmolLM2 weights (kvsieve's safetensors cache), prefill the same context token ids, append the same question
ids and decode greedily the same number of tokens, in query-agnostic mode. The kvpress side follows its pipeline's
own loop (``KVPressTextGenerationPipeline.generate_answer``: positions continue from the uncompressed context
length). Prefill times are each side's own single-pass prefill of the context, in the same run.

Pairs: streaming_llm/StreamingLLMPress, snapkv/SnapKVPress, tova/TOVAPress, knorm/KnormPress, h2o/ObservedAttentionPress
(kvpress needs eager attention for it, which is part of what is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvsieve import Sieve, load_model, prefill
from kvsieve.bench.runner import split_prompt
from kvsieve.compat import cache_kwargs
from kvsieve.models import converted_dir
from kvsieve.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "h2o": "ObservedAttentionPress",
}
KVPRESS_PINS = ["torch==2.13.0", "transformers==5.2.0", "kvpress==0.5.5", "gguf", "accelerate"]


def ensure_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import kvpress"], capture_output=True).returncode == 0:
        return python
    print(f"creating {path} with {' '.join(KVPRESS_PINS)} (about 70 s, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, KVPRESS_PINS[0]], check=True)  # torch first: the cached CPU build, not CUDA wheels
    subprocess.run([*pip, *KVPRESS_PINS], check=True)
    return python


@torch.no_grad()
def run_ours(model, tok, samples: list[dict], ratios: list[float]) -> list[dict]:
    rows = []
    for s in samples:
        ctx = torch.tensor([s["context_ids"]])
        follow = torch.tensor([s["question_ids"]])
        for spec in PAIRS:
            for ratio in ratios:
                with Sieve(spec, compression=ratio).attach(model) as cache:
                    t0 = time.perf_counter()
                    logits = prefill(model, ctx, cache)
                    seconds = time.perf_counter() - t0
                    with cache.paused():
                        logits = model(follow, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
                        out = []
                        for _ in range(s["max_new_tokens"]):
                            token = int(logits[0].argmax())
                            if token in s["eos"]:
                                break
                            out.append(token)
                            step = model(torch.tensor([[token]]), **cache_kwargs(model, cache), logits_to_keep=1)
                            logits = step.logits[:, -1]
                rows.append(
                    {
                        "method": spec,
                        "ratio": ratio,
                        "sample": s["id"],
                        "prediction_ids": out,
                        "prefill_seconds": seconds,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # tasks full attention solves on SmolLM2-135M (it solves no variable_tracking sample, so that one compares nothing)
    parser.add_argument("--tasks", default="passkey,niah_single_number,qa")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--venv", default=str(ROOT / ".venv-kvpress"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]

    model, tok = load_model("smollm2-135m")
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    samples, tasks = [], {}
    for name in args.tasks.split(","):
        for i, sample in enumerate(get_task(name).generate(tok, length=args.length, n=args.samples, seed=0)):
            p = split_prompt(tok, sample)
            sid = f"{name}/{i}"
            tasks[sid] = (get_task(name), sample)
            samples.append(
                {
                    "id": sid,
                    "context_ids": p.context[0].tolist(),
                    "question_ids": torch.cat([p.question, p.answer_prefix], dim=1)[0].tolist(),
                    "max_new_tokens": sample.max_new_tokens,
                    "eos": eos,
                }
            )

    python = ensure_venv(Path(args.venv))
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "job.json"
        spec_file.write_text(
            json.dumps(
                {
                    "model_dir": str(converted_dir("smollm2-135m")),
                    "samples": samples,
                    "ratios": ratios,
                    "presses": PAIRS,
                    "threads": args.threads,
                }
            )
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        # alternate the two sides' turns is not possible across processes; theirs runs first, ours right after
        subprocess.run([python, str(ROOT / "benchmarks" / "kvpress_worker.py"), str(spec_file)], check=True, env=env)
        theirs = [json.loads(line) for line in (Path(tmp) / "job.out.jsonl").read_text().splitlines()]
    ours = run_ours(model, tok, samples, ratios)

    def table(rows):
        out = {}
        for r in rows:
            task, sample = tasks[r["sample"]]
            score = task.score(sample, tok.decode(r["prediction_ids"], skip_special_tokens=True))
            out.setdefault((r["method"], r["ratio"]), []).append((score, r["prefill_seconds"]))
        return out

    a, b = table(ours), table(theirs)
    print(
        f"SmolLM2-135M, {args.length}-token contexts, tasks {args.tasks}, {args.samples} samples each, "
        f"query-agnostic; score = mean string match x100"
    )
    print(f"{'kvsieve':<15}{'kvpress':<24}{'ratio':>6}{'ours':>8}{'theirs':>8}{'prefill ours/theirs':>22}")
    for (method, ratio), mine in sorted(a.items()):
        other = b[(method, ratio)]
        s_ours = 100 * statistics.mean(x[0] for x in mine)
        s_theirs = 100 * statistics.mean(x[0] for x in other)
        t_ratio = statistics.median(x[1] for x in mine) / statistics.median(x[1] for x in other)
        print(f"{method:<15}{PAIRS[method]:<24}{ratio:>6.2f}{s_ours:>8.1f}{s_theirs:>8.1f}{t_ratio:>22.2f}")


if __name__ == "__main__":
    main()
