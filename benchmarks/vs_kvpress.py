"""kvsieve vs kvpress 0.5.5, side by side: every training-free press kvsieve has, same samples, tokens and ratios.

Usage: python benchmarks/vs_kvpress.py [--samples 2] [--ratios 0.25,0.5,0.75] [--tasks ...] [--modes agnostic,aware]
[--pairs snapkv,think,...] [--length 2048] [--out vs-kvpress-out] [--venv .venv-kvpress]

kvpress 0.5.5 requires transformers < 5.3, so it runs in its own virtual environment (made on first use, reused
after; about 70 s): torch 2.13.0, transformers 5.2.0, kvpress 0.5.5 and its dependencies. Both sides load the same
converted SmolLM2 weights (kvsieve's safetensors cache), prefill the same ids, append the same follow-up ids and decode
greedily the same number of tokens. Two modes: ``agnostic`` compresses the context alone, then appends the question
(kvpress's query-agnostic protocol); ``aware`` compresses the context and the question together (all but its last
token), then appends that last token. The kvpress side follows its pipeline's own loop
(``KVPressTextGenerationPipeline.generate_answer``: positions continue from the uncompressed length). Prefill times
are each side's own single-pass prefill, in the same run: item by item (a sample in one mode), kvpress's side
first, in its own process, then ours, so both sides of an item run under the same load.

Progressive and resumable: each side appends a line per row to OUT/theirs.jsonl or OUT/ours.jsonl as the row
finishes; the same command (or any subset or superset of its pairs, ratios, tasks and modes) runs only the rows
missing on a side and prints the table of the rows asked for, also written to OUT/vs_kvpress.txt. OUT/settings.json
holds the settings that change a row (length, samples per task: a sample's needle depth depends on how many there
are, threads); other settings need another --out. An item resumed half-way pairs rows of two runs: its time ratio
then compares two moments.

Pairs (``PAIRS``: a kvsieve spec and the kvpress press, ``{r}`` the compression ratio): the scorers, their wrappers
(``adakv``, ``critical_adakv``, ``criticalkv``, ``chunkkv``, ``entropy_chunkkv``, ``rerotate``, ``merging``,
``per_layer`` with a ramp of per-layer ratios whose mean is ``r``, ``compose`` with an equal share per stage),
``think`` (``r`` is the share of key channels pruned; no token is evicted; kvpress's ``kept`` is its memory share
``1 - r/2``), ``simlayerkv`` (kvpress keeps ``n_initial + n_recent - n_last`` tokens in a lazy layer, so ``n_recent``
is set to make that kvsieve's budget) and ``dms`` (a score threshold, no ratio: run once, printed with ratio
``thr``). ``h2o`` pairs with ``ObservedAttentionPress`` (kvpress needs eager attention for it, which is part of what is
compared). The ``kept`` columns are the share of context tokens held after the prefill (kvsieve: mean over layers and
heads; kvpress: ``1 - press.compression_ratio``, which DMSPress measures).

Not paired (``UNPAIRED``, printed at the end): kvpress presses that need a download (``QFilterPress``'s filters,
``DuoAttentionPress``'s patterns, ``LUKVPress``'s curves), ``FinchPress`` (it adds a delimiter token to the tokenizer
and the embeddings) and the decoding-time presses (``CAMPress``, ``DecodingPress``): this protocol compresses at the
prefill.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvsieve import Sieve, build, load_model, prefill
from kvsieve.bench.runner import split_prompt
from kvsieve.compat import cache_kwargs
from kvsieve.errors import UnknownMethodError
from kvsieve.models import converted_dir
from kvsieve.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS = 30  # SmolLM2-135M (per_layer's ramp has one ratio per layer)
SNAP = "snapkv(window=64)"  # kvpress's SnapKVPress window (kvsieve's default is the paper's 32)
# on knorm's scores (minus the key norm): SmolLM2's key norms have quantiles 10/50/90% = 14.8/18.7/22.7 (all layers,
# a 1k-token prompt), so about half the tokens outside the window go; the kept share is printed for both sides
DMS_THRESHOLD = -18.7


def _ramp(r: float) -> list[float]:
    """Per-layer ratios rising linearly across the layers, mean ``r`` (kept inside [0, 0.95])."""
    spread = min(r, 0.95 - r, 0.2)
    return [round(r - spread + 2 * spread * i / (N_LAYERS - 1), 4) for i in range(N_LAYERS)]


def _stage(r: float) -> float:
    """The ratio of each of two chained stages that together remove ``r``."""
    return 1 - math.sqrt(1 - r)


# label -> (kvsieve spec, kvsieve budget kind, kvpress expression); budget kinds: "ratio" (compression=r),
# "mean" (compression = mean of the spec's per-layer ratios), "none" (no token budget), "thr" (threshold: run once)
PAIRS: dict[str, tuple[str, str, str]] = {
    "streaming_llm": ("streaming_llm(rerotate=False)", "ratio", "StreamingLLMPress(compression_ratio={r})"),
    "snapkv": (SNAP, "ratio", "SnapKVPress(compression_ratio={r})"),
    "tova": ("tova", "ratio", "TOVAPress(compression_ratio={r})"),
    "knorm": ("knorm", "ratio", "KnormPress(compression_ratio={r})"),
    "h2o": ("h2o", "ratio", "ObservedAttentionPress(compression_ratio={r})"),
    "random": ("random", "ratio", "RandomPress(compression_ratio={r})"),
    "pyramidkv": (f"pyramidkv:{SNAP}", "ratio", "PyramidKVPress(compression_ratio={r})"),
    "adakv": (f"adakv:{SNAP}", "ratio", "AdaKVPress(SnapKVPress(compression_ratio={r}))"),
    "expected_attention": ("expected_attention", "ratio", "ExpectedAttentionPress(compression_ratio={r})"),
    "keydiff": ("keydiff", "ratio", "KeyDiffPress(compression_ratio={r})"),
    "lagkv": ("lagkv", "ratio", "LagKVPress(compression_ratio={r})"),
    "leverage_score": ("leverage_score", "ratio", "LeverageScorePress(compression_ratio={r})"),
    "compactor": ("compactor", "ratio", "CompactorPress(compression_ratio={r})"),
    "cur": ("cur", "ratio", "CURPress(compression_ratio={r})"),
    "cap": ("cap", "ratio", "CapPress(compression_ratio={r})"),
    "non_causal_attention": ("non_causal_attention", "ratio", "NonCausalAttnPress(compression_ratio={r})"),
    "kvzip": ("kvzip", "ratio", "KVzipPress(compression_ratio={r})"),
    "kvzip_plus": ("kvzip_plus", "ratio", "KVzipPress(compression_ratio={r}, kvzip_plus_normalization=True)"),
    "kvgrad": ("kvgrad", "ratio", "KVgradPress(compression_ratio={r})"),
    "kvcompose": ("kvcompose", "ratio", "KVComposePress(compression_ratio={r})"),
    "criticalkv": (f"criticalkv:{SNAP}", "ratio", "CriticalKVPress(SnapKVPress(compression_ratio={r}))"),
    "critical_adakv": (f"critical_adakv:{SNAP}", "ratio", "CriticalAdaKVPress(SnapKVPress(compression_ratio={r}))"),
    "chunkkv": (f"chunkkv:{SNAP}", "ratio", "ChunkKVPress(SnapKVPress(compression_ratio={r}))"),
    "entropy_chunkkv": (
        f"entropy_chunkkv:{SNAP}", "ratio", "EntropyGatedChunkKVPress(SnapKVPress(compression_ratio={r}))",
    ),
    "rerotate": (f"rerotate:{SNAP}", "ratio", "KeyRerotationPress(SnapKVPress(compression_ratio={r}))"),
    "merging": (f"merging:{SNAP}", "ratio", "MergingPress(SnapKVPress(compression_ratio={r}))"),
    "per_layer": (
        "per_layer(ratios={ramp}):" + SNAP, "mean",
        "PerLayerCompressionPress(SnapKVPress(), compression_ratios=list({ramp}))",
    ),
    "compose": (
        f"compose(methods=('{SNAP}', 'knorm'))", "ratio",
        "ComposedPress([SnapKVPress(compression_ratio={s}), KnormPress(compression_ratio={s})])",
    ),
    "think": ("think(ratio={r})", "none", "ThinKPress(key_channel_compression_ratio={r})"),
    "simlayerkv": ("simlayerkv(threshold=0.9)", "ratio", "SimLayerKVPress(lazy_threshold=0.9, n_recent={keep} - 3)"),
    "dms": (
        f"dms(threshold={DMS_THRESHOLD}, window=128):knorm", "thr",
        f"DMSPress(KnormPress(), threshold={DMS_THRESHOLD}, sliding_window_size=128)",
    ),
}  # fmt: skip
UNPAIRED = {
    "qfilter": "QFilterPress downloads its filters from the Hugging Face hub",
    "duoattention": "DuoAttentionPress downloads its head patterns (or profiles with a hub tokenizer)",
    "lukv": "LUKVPress downloads its budget curves from GitHub",
    "finch": "FinchPress adds a delimiter token to the tokenizer and resizes the embeddings",
    "cam": "CAMPress compresses only while decoding (a DecodingPress); this protocol compresses at the prefill",
}


def expand(template: str, ratio: float, keep: int) -> str:
    """A PAIRS template with its ratio fields filled in."""
    return template.format(r=ratio, s=round(_stage(ratio), 6), ramp=tuple(_ramp(ratio)), keep=keep)


def our_sieve(label: str, ratio: float) -> Sieve:
    spec, kind, _ = PAIRS[label]
    spec = expand(spec, ratio, 0)
    if kind == "ratio":
        return Sieve(spec, compression=ratio)
    if kind == "mean":
        return Sieve(spec, compression=statistics.mean(_ramp(ratio)))
    if kind == "thr":
        return Sieve(spec, compression=0.0)
    return Sieve(spec)


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


def jobs(items: list[dict], labels: list[str], ratios: list[float]) -> list[dict]:
    """One row per (item, pair, ratio): what each side runs (a threshold pair runs once, ratio None)."""
    out = []
    for item in items:
        n = len(item["prefix_ids"])
        for label in labels:
            for ratio in [None] if PAIRS[label][1] == "thr" else ratios:
                r = 0.0 if ratio is None else ratio
                press = expand(PAIRS[label][2], r, max(1, int(n * (1 - r))))
                out.append({"item": item["id"], "label": label, "ratio": ratio, "press": press})
    return out


def row_key(row: dict) -> tuple:
    """What identifies a row on either side: its item, pair, ratio and the exact kvpress expression."""
    return row["item"], row["label"], row["ratio"], row["press"]


def load_rows(path: Path) -> dict[tuple, dict]:
    """The rows a side has finished, errors included (a press that fails fails again; delete its line to retry); a
    line a crash cut short is left out, so that row runs again."""
    done: dict[tuple, dict] = {}
    if path.exists():
        for text in path.read_text().splitlines():
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                continue
            done[row_key(row)] = row
    return done


def open_out(out: Path, settings: dict) -> None:
    """OUT with its settings file; refuses a folder measured with other settings (never mixes them)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"error: {out} holds rows measured with {path.read_text().strip()}; pass another --out")
    path.write_text(json.dumps(settings) + "\n")


@torch.no_grad()
def run_ours(model, tok, items: dict[str, dict], rows: list[dict], log: Path) -> None:
    """Our side of ``rows``, each appended to ``log`` as it finishes."""
    for row in rows:
        item = items[row["item"]]
        prefix, follow = torch.tensor([item["prefix_ids"]]), torch.tensor([item["follow_ids"]])
        try:
            with our_sieve(row["label"], row["ratio"] or 0.0).attach(model) as cache:
                t0 = time.perf_counter()
                logits = prefill(model, prefix, cache, tokenizer=tok)
                seconds = time.perf_counter() - t0
                held = [t if isinstance(t, int) else statistics.mean(t) for t in cache.kv_tokens()]
                with cache.paused():
                    logits = model(follow, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
                    out = []
                    for _ in range(item["max_new_tokens"]):
                        token = int(logits[0].argmax())
                        if token in item["eos"]:
                            break
                        out.append(token)
                        step = model(torch.tensor([[token]]), **cache_kwargs(model, cache), logits_to_keep=1)
                        logits = step.logits[:, -1]
            result = {
                "prediction_ids": out,
                "prefill_seconds": seconds,
                "kept": statistics.mean(held) / prefix.shape[1],
            }
        except Exception as err:  # reported in the table; the others still run
            result = {"error": f"{type(err).__name__}: {err}"[:120]}
        with log.open("a") as f:
            f.write(json.dumps({**row, **result}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # tasks full attention solves on SmolLM2-135M (it solves no variable_tracking sample, so that one compares nothing)
    parser.add_argument("--tasks", default="passkey,niah_single_number,qa")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--modes", default="agnostic,aware", help="agnostic (context alone), aware (with question)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help="labels of PAIRS to run (default: all)")
    parser.add_argument("--out", default="vs-kvpress-out", help="rows of both sides (resumable) and the table")
    parser.add_argument("--venv", default=str(ROOT / ".venv-kvpress"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    labels = args.pairs.split(",")
    modes = args.modes.split(",")
    for name in labels:
        if name not in PAIRS:
            raise SystemExit(f"unknown pair {name!r}: choose from {', '.join(PAIRS)}")
    for mode in modes:
        if mode not in ("agnostic", "aware"):
            raise SystemExit(f"unknown mode {mode!r}: agnostic or aware")
    missing = []  # pairs whose kvsieve method this checkout does not register (another helper's, not yet merged)
    for name in labels:
        try:
            build(expand(PAIRS[name][0], 0.5, 0))
        except UnknownMethodError:
            missing.append(name)
    labels = [name for name in labels if name not in missing]

    model, tok = load_model("smollm2-135m")
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    items, tasks = {}, {}
    for name in args.tasks.split(","):
        for i, sample in enumerate(get_task(name).generate(tok, length=args.length, n=args.samples, seed=0)):
            p = split_prompt(tok, sample)
            context = p.context[0].tolist()
            question = torch.cat([p.question, p.answer_prefix], dim=1)[0].tolist()
            for mode in modes:
                sid = f"{name}/{i}/{mode}"
                tasks[sid] = (get_task(name), sample)
                prefix, follow = (context, question) if mode == "agnostic" else (context + question[:-1], question[-1:])
                items[sid] = {
                    "id": sid, "prefix_ids": prefix, "follow_ids": follow, "max_new_tokens": sample.max_new_tokens,
                    "eos": eos,
                }  # fmt: skip
    rows = jobs(list(items.values()), labels, ratios)
    out = Path(args.out)
    open_out(out, {"length": args.length, "samples": args.samples, "threads": args.threads})
    theirs_file, ours_file = out / "theirs.jsonl", out / "ours.jsonl"

    python = ensure_venv(Path(args.venv))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    for sid in items:  # item by item, theirs then ours: both sides of an item under the same load
        done = load_rows(theirs_file)
        todo = [r for r in rows if r["item"] == sid and row_key(r) not in done]
        if todo:
            with tempfile.TemporaryDirectory() as tmp:
                spec_file = Path(tmp) / "job.json"
                job = {
                    "model_dir": str(converted_dir("smollm2-135m")), "items": {sid: items[sid]}, "rows": todo,
                    "threads": args.threads, "out": str(theirs_file.resolve()),
                }  # fmt: skip
                spec_file.write_text(json.dumps(job))
                subprocess.run([python, str(ROOT / "benchmarks" / "kvpress_worker.py"), str(spec_file)], env=env)
        done = load_rows(ours_file)
        run_ours(model, tok, items, [r for r in rows if r["item"] == sid and row_key(r) not in done], ours_file)
    theirs_done, ours_done = load_rows(theirs_file), load_rows(ours_file)
    missing_rows = {"error": "not measured (the run was cut short, or the worker failed: see above)"}
    theirs = [theirs_done.get(row_key(r), {**r, **missing_rows}) for r in rows]
    ours = [ours_done.get(row_key(r), {**r, **missing_rows}) for r in rows]

    def table(result_rows):
        out = {}
        for r in result_rows:
            key = (r["label"], r["item"].rsplit("/", 1)[1], r["ratio"])
            if "error" in r:
                out.setdefault(key, []).append(r["error"])
                continue
            task, sample = tasks[r["item"]]
            score = task.score(sample, tok.decode(r["prediction_ids"], skip_special_tokens=True))
            out.setdefault(key, []).append((score, r["prefill_seconds"], r.get("kept")))
        return out

    def summary(cells) -> tuple[str, float | None, str]:
        errors = [c for c in cells if isinstance(c, str)]
        if errors:
            return "err", None, "-"
        kept = [c[2] for c in cells if c[2] is not None]
        return (
            f"{100 * statistics.mean(c[0] for c in cells):.1f}",
            statistics.median(c[1] for c in cells),
            f"{statistics.mean(kept):.2f}" if kept else "-",
        )

    a, b = table(ours), table(theirs)
    lines: list[str] = []
    lines.append(
        f"SmolLM2-135M, {args.length}-token contexts, tasks {args.tasks}, {args.samples} samples each, "
        f"modes {args.modes}; score = mean string match x100; kept = share of the prefix held after the prefill"
    )
    head = f"{'kvsieve':<40}{'kvpress':<52}{'mode':<9}{'ratio':>6}{'ours':>7}{'theirs':>7}"
    lines.append(f"{head}{'kept ours':>10}{'kept theirs':>12}{'prefill ours/theirs':>21}")
    errors = []
    for label, mode, ratio in sorted(a, key=lambda k: (k[0], k[1], k[2] or 0.0)):
        (s_o, t_o, k_o), (s_t, t_t, k_t) = summary(a[(label, mode, ratio)]), summary(b[(label, mode, ratio)])
        errors += [f"{label} {mode} ours: {e}" for e in a[(label, mode, ratio)] if isinstance(e, str)][:1]
        errors += [f"{label} {mode} theirs: {e}" for e in b[(label, mode, ratio)] if isinstance(e, str)][:1]
        r = 0.0 if ratio is None else ratio
        ours_spec = expand(PAIRS[label][0], r, 0)
        press = ":".join(re.findall(r"[A-Z]\w*Press", PAIRS[label][2]))  # the press and the presses it wraps
        t = f"{t_o / t_t:.2f}" if t_o is not None and t_t is not None else "-"
        rtxt = "thr" if ratio is None else f"{ratio:.2f}"
        label_txt = ours_spec if len(ours_spec) <= 38 else ours_spec[:35] + "..."
        lines.append(f"{label_txt:<40}{press:<52}{mode:<9}{rtxt:>6}{s_o:>7}{s_t:>7}{k_o:>10}{k_t:>12}{t:>21}")
    for line in errors:
        lines.append(f"error: {line}")
    if missing:
        lines.append(f"skipped, not registered in this checkout: {', '.join(missing)}")
    lines.append("not paired: " + "; ".join(f"{k} ({v})" for k, v in UNPAIRED.items()))
    print("\n".join(lines))
    (out / "vs_kvpress.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
