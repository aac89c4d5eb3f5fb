"""kvsieve explain vs inseq, side by side: the same model, token ids and targets; rank agreement of the scores and
the time per example.

Usage: python benchmarks/vs_inseq.py [--examples 10] [--length 256] [--steps 3] [--methods saliency,...]
[--seeds 0,1] [--reagent-max-tokens 96] [--reagent-max-steps 3000] [--out vs-inseq-out] [--venv .venv-inseq]
[--threads 2]

inseq runs in its own virtual environment (``--venv``; made on first use and repaired when inseq is missing, about a
minute: torch 2.13.0 pinned so pip never pulls CUDA wheels, then ``inseq`` and its dependencies from the package
index) and in its own process (benchmarks/inseq_worker.py), which stays up for the whole run: for every example and
method the two sides run one after the other, alternating who goes first, each timing only its own attribution call.

Examples: even ones are short natural sentences (``SENTENCES``) whose target is SmolLM2's greedy continuation of
``--steps`` tokens; odd ones are the bench's task prompts (``--tasks``, chat template plus answer prefix, about
``--length`` tokens of context) whose target is the gold answer's first ``--steps`` tokens. The prompt and
prompt + target are tokenized as inseq tokenizes them (the full text in one go); kvsieve gets exactly those ids and
the worker checks that inseq attributed the same ones (inseq's output leaves out the tokens equal to the pad token,
SmolLM2's ``<|im_end|>``, which the chat prompts hold, and cuts its score rows to as many positions: the comparison
covers the positions inseq's rows keep, see ``same_tokens``).

Settings, the same on both sides (every one is inseq 0.7's default unless said otherwise):
- model: the embedded SmolLM2-135M-Instruct, float32, SDPA attention, CPU; inseq loads kvsieve's converted
  safetensors folder (``kvsieve.models.converted_dir``), so both read the same weights.
- attributed function: the target token's softmax probability (inseq's ``probability``), one attribution per target
  token over its whole context (prompt plus the target tokens before it).
- gradients w.r.t. the input embeddings; a token's score is the L2 norm of its attribution vector over the embedding
  dimension (inseq's ``vnorm`` aggregation; inseq's default view then divides each step by its sum, which no rank
  comparison sees). ``saliency`` = Captum's Saliency (|gradient|, then the norm), ``input_x_gradient`` = Captum's
  InputXGradient, ``integrated_gradients`` = Captum's IntegratedGradients: 50 steps, Gauss-Legendre (Captum's
  default ``method``), internal batch 10 (kvsieve's batch; no effect on the values), and inseq's baseline:
  the UNK token's embedding at every position except EOS tokens (kvsieve's own default is a zero baseline; here it
  is given inseq's baseline ids, asked from the worker).
- ``reagent``: keep_top_n / rational_size 5, stopping top-k 3, replacing ratio 0.3, 16 probes (inseq's default;
  kvsieve's default is 8), at most 3,000 probing steps per target token (``--reagent-max-steps``, both sides);
  seeds ``--seeds`` (a for both sides, b for inseq's second run and kvsieve's second run). Replacements differ by
  design: kvsieve's replacer is a causal LM (SmolLM2 itself, its documented simplification of the paper's RoBERTa);
  inseq's is uniform among tokens of the same part of speech, and since nltk's tagger is a download, the worker
  gives inseq's sampler one tag for the whole vocabulary (uniform replacement). ``reagent_uniform`` runs kvsieve's
  ReAGent with a uniform replacer (a stand-in model whose logits are constant; kvsieve never draws the original
  token, inseq may, with probability 1/49152), so the algorithms are compared with the same replacement
  distribution. Each side's probing steps per target token are logged. ReAGent runs only on examples of at most
  ``--reagent-max-tokens`` tokens (its cost is hundreds of forward passes of 16 probes per target token).

Agreement: Spearman rank correlation over a step's context positions (ties get average ranks), per example and per
target token; the table gives the mean and the minimum over all of them. For ReAGent: kvsieve (seed a) vs inseq
(seed a), next to inseq seed a vs inseq seed b and kvsieve seed a vs kvsieve seed b (the spread of each method with
itself). inseq's two ReAGent runs per example are made once and serve both ``reagent`` and ``reagent_uniform``.
Time: the median over examples of the per-example ratio kvsieve seconds / inseq seconds. Each row of the log
also holds both sides' score matrices.

Results go to OUT/vs_inseq.jsonl as they finish (one line per example and method; a run with the same settings
resumes from it, or extends it with more ``--examples``) and the table to stdout and OUT/vs_inseq.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
STOPPED = ("stopped_ours", "stopped_inseq")
GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients")
METHODS = (*GRADIENT_METHODS, "reagent", "reagent_uniform")
IG_STEPS = 50
IG_BATCH = 10
REAGENT = {"rational_size": 5, "top_k": 3, "replacing_ratio": 0.3, "num_probes": 16, "max_steps": 3000}


def inseq_reagent(cfg: dict) -> dict:
    """inseq's names for the same ReAGent hyperparameters."""
    return {
        "keep_top_n": cfg["rational_size"],
        "stopping_condition_top_k": cfg["top_k"],
        "replacing_ratio": cfg["replacing_ratio"],
        "num_probes": cfg["num_probes"],
        "max_probe_steps": cfg["max_steps"],
    }


INSEQ_PINS = ["torch==2.13.0", "inseq==0.7.1"]
# Natural text, each longer than ReAGent's rational of 5 tokens (which it would keep whole). The first five are short
# and strongly cued: ReAGent stops a probe once its 5 most important tokens, the others replaced (uniformly, on inseq's
# side here), put the target back in the top 3, which a few hundred steps reach only when a few tokens determine the
# target ("The Eiffel Tower is in the city of" -> " Paris": all 16 probes stopped within 55 steps); on the longer
# sentences inseq's probes may not stop (NaN scores, left out of the comparison and counted).
SENTENCES = (
    "The Eiffel Tower is in the city of",
    "Monday, Tuesday, Wednesday, Thursday,",
    "Romeo and Juliet is a play written by William",
    "The chemical symbol for gold is",
    "The largest planet in our solar system is",
    "When the sun goes down over the quiet harbour and the last boats come home, the old fishermen",
    "She opened the old wooden box that had been locked in the attic for years and found a letter from",
    "Water boils at a temperature of one hundred degrees Celsius at sea level, but on a high mountain it",
    "The first step in baking a good loaf of bread at home is to mix the flour, the water, the salt and",
    "After three days of heavy rain, the river rose so high that the people of the small village decided to",
    "Python is a popular programming language because its syntax is simple and it lets beginners",
    "The committee postponed its final decision on the new budget because two of its members were",
    "In the middle of the night, long after everyone had gone to sleep, the dog started barking at the",
    "Photosynthesis is the process by which green plants and some bacteria use the energy of sunlight to",
    "The capital of France is a city famous for its museums, its cafes and the tall iron tower built by",
)


# ---------------------------------------------------------------------------------------------------- pure helpers


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties sharing their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length score vectors; NaN when either is constant or holds a NaN (inseq's
    ReAGent scores a target token NaN when none of its probes stopped within the step cap)."""
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def per_step_spearman(ours: list[list], theirs: list[list], n_prompt: int) -> list[float]:
    """Spearman per target step over its context (the first ``n_prompt + t`` positions of row ``t``)."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} steps on one side, {len(theirs)} on the other")
    out = []
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        n = n_prompt + t
        out.append(spearman(np.asarray(a[:n], dtype=float), np.asarray(b[:n], dtype=float)))  # None -> NaN
    return out


def summarize(values: list[float]) -> tuple[float, float, int]:
    """(mean, min, count) of the finite values; NaNs (a constant score row) are left out and counted apart."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    return statistics.fmean(finite), min(finite), len(finite)


def align(tokenizer, prompt: str, target: str, steps: int) -> tuple[str, str, list[int], int] | None:
    """``(prompt text, full text, ids, n_prompt)`` such that tokenizing the full text in one go (as inseq does) gives
    the prompt's ids followed by 1 to ``steps`` target ids: the full text is the prompt plus the longest prefix of
    ``target`` (cut by characters, not after a space) that does so; None when there is none. A target whose leading
    space is a token of its own (SmolLM2 before digits: " 1138" is " ", "1", "1", ...) moves that space to the prompt
    when no cut fits otherwise."""
    found = _align(tokenizer, prompt, target, steps)
    if found is None and target[:1].isspace():
        lead = target[: len(target) - len(target.lstrip())]
        found = _align(tokenizer, prompt + lead, target[len(lead) :], steps)
    return found


def _align(tokenizer, prompt: str, target: str, steps: int) -> tuple[str, str, list[int], int] | None:
    p_ids = tokenizer(prompt).input_ids
    for k in range(len(target), 0, -1):
        if target[k - 1].isspace():  # a cut never ends on a space (a token of its own for a BPE tokenizer)
            continue
        full = prompt + target[:k]
        ids = tokenizer(full).input_ids
        if ids[: len(p_ids)] == p_ids and 0 < len(ids) - len(p_ids) <= steps:
            return prompt, full, ids, len(p_ids)
    return None


def same_tokens(ids: list[int], shown: list[int], hidden: int | None, n_prompt: int) -> bool:
    """Whether ``shown`` (the tokens inseq returns) is ``ids``, or ``ids`` without its tokens equal to ``hidden`` in
    the prompt. inseq attributes the whole sequence but leaves the pad token out of the tokens it returns (SmolLM2's
    pad token is its EOS, ``<|im_end|>``, which chat prompts hold) and cuts its score rows to that many positions: the
    scores keep their original positions (the gradients equal ours bitwise there) and the context's last positions,
    as many as it left out, are missing; the comparison covers the positions its rows keep."""
    return shown == ids or ([t for t in ids if t != hidden] == shown and hidden not in ids[n_prompt:])


# ------------------------------------------------------------------------------------------------------ the venv


def ensure_venv(path: Path) -> Path:
    """The inseq venv's python, creating the venv or (re)installing inseq into it when missing."""
    python = path / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import inseq"], capture_output=True).returncode == 0:
        return python
    print(f"setting up {path} with {' '.join(INSEQ_PINS)} (about a minute, once)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    constraints = path / "constraints.txt"
    constraints.write_text(INSEQ_PINS[0] + "\n")  # every install keeps the CPU torch: never the CUDA wheels
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    for packages in ([INSEQ_PINS[0]], INSEQ_PINS[1:]):
        done = subprocess.run([*pip, *packages])
        if done.returncode != 0:
            raise SystemExit(
                f"error: could not install {' '.join(packages)} into {path} (is the package index reachable?); "
                f"install them by hand with {python} -m pip install {' '.join(packages)}, or pass --venv"
            )
    return python


class Inseq:
    """The worker process in the inseq venv: one JSON request, one JSON reply."""

    def __init__(self, python: Path, model_dir: str, threads: int) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
        script = str(ROOT / "benchmarks" / "inseq_worker.py")
        self.proc = subprocess.Popen(
            [str(python), script, model_dir, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        hello = self._read()
        self.version = hello.get("inseq", "?")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the inseq worker exited (code {self.proc.poll()}); its errors are above")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --------------------------------------------------------------------------------------------------- kvsieve side


class UniformReplacer(torch.nn.Module):
    """A stand-in replacer LM with constant logits: kvsieve's ReAGent then draws replacements uniformly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, vocab, bias=False)
        self.vocab = vocab

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, **_):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros((*input_ids.shape, self.vocab)))


def run_ours(model, tok, method: str, ids: list[int], n_prompt: int, seed: int, baseline: list[int] | None, cfg: dict):
    """kvsieve's scores ``[step][position]`` (None past each step's context), seconds, and ReAGent's probing steps and
    stopped probes per target token."""
    from kvsieve.explain import gradients
    from kvsieve.explain.problem import Problem
    from kvsieve.explain.reagent import ReagentConfig, reagent

    problem = Problem(model, tok, torch.tensor([ids]), n_prompt, seed=seed)
    iterations: list[int] = []
    stopped: list[int] = []
    t0 = time.perf_counter()
    if method == "integrated_gradients":
        base = model.get_input_embeddings()(torch.tensor(baseline)).detach()
        scores = gradients.integrated_gradients(problem, n_steps=IG_STEPS, batch=IG_BATCH, baseline=base)
    elif method in GRADIENT_METHODS:
        scores = getattr(gradients, method)(problem)
    else:
        vocab = model.get_output_embeddings().weight.shape[0]
        replacer = UniformReplacer(vocab) if method == "reagent_uniform" else None
        scores, info = reagent(problem, replacer=replacer, config=ReagentConfig(**cfg))
        iterations = [s["iterations"] for s in info["steps"]]
        stopped = [s["stopped_probes"] for s in info["steps"]]
    seconds = time.perf_counter() - t0
    rows = [[None if math.isnan(x) else x for x in row] for row in scores.tolist()]
    return rows, seconds, (iterations, stopped)


# ---------------------------------------------------------------------------------------------------- the run


def examples(tok, model, n: int, length: int, steps: int, tasks: list[str]):
    """``(id, prompt text, target text)`` for ``n`` examples: natural sentences and task prompts, alternating."""
    from kvsieve.tasks import get_task

    n_task = n // 2  # odd examples
    per_task = {
        name: list(get_task(name).generate(tok, length=length, n=-(-n_task // len(tasks)), seed=0))
        for name in tasks[:n_task]
    }
    out = []
    for i in range(n):
        if i % 2 == 0:
            text = SENTENCES[(i // 2) % len(SENTENCES)]
            ids = tok(text, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )  # fmt: skip
            out.append((f"natural#{i // 2}", text, tok.decode(gen[0, ids.shape[1] :])))
        else:
            j = i // 2
            name = tasks[j % len(tasks)]
            s = per_task[name][j // len(tasks)]
            chat = tok.apply_chat_template(
                [{"role": "user", "content": s.prompt}], tokenize=False, add_generation_prompt=True
            )
            out.append((f"{name}#{s.index}", chat + s.answer_prefix, " " + s.answers[0].strip()))
    return out


def load_log(path: Path, header: dict) -> dict[tuple[str, str], dict]:
    """Rows already measured by a run with the same settings (a run with more ``--examples`` extends it; a row that
    ended in an error runs again); a fresh log when there is none."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header}) + "\n")
        return {}
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # a line a crash cut short: that row runs again
            break
    settings = {k: v for k, v in json.loads(json.dumps(header)).items() if k != "examples"}  # more examples: extend
    if not lines or {k: v for k, v in lines[0].get("header", {}).items() if k != "examples"} != settings:
        raise SystemExit(f"error: {path} holds a run with other settings; pass another --out, or delete it")
    rows = {(r["example"], r["method"]): r for r in lines[1:] if "error" not in r}  # an error runs again
    print(f"resuming: {len(rows)} rows already in {path}", flush=True)
    return rows


_REAGENT_RUNS: dict[tuple, dict] = {}  # inseq's ReAGent runs by (method, text, seed), computed once


def measure(args, model, tok, worker: Inseq, ex: tuple, method: str, order: int, seeds: list[int]) -> dict:
    """One example and method: both sides (alternating who goes first), their scores' agreement and times."""
    _, prompt, target = ex
    aligned = align(tok, prompt, target, args.steps)
    if aligned is None:
        return {"skipped": "prompt and target do not split at a token boundary"}
    prompt, full, ids, n_prompt = aligned
    if method.startswith("reagent") and len(ids) > args.reagent_max_tokens:
        return {"skipped": f"{len(ids)} tokens > --reagent-max-tokens {args.reagent_max_tokens}"}
    baseline = None
    if method == "integrated_gradients":
        base = worker.ask(op="baseline", full=full)
        if base.get("ids") != ids:
            return {"error": "inseq tokenizes the example differently"}
        baseline = base["baseline_ids"]
    inseq_method = "reagent" if method.startswith("reagent") else method
    cfg = {**REAGENT, "max_steps": args.reagent_max_steps}
    init = inseq_reagent(cfg) if inseq_method == "reagent" else {}
    # Captum integrates with Gauss-Legendre by default; its ``method`` keyword cannot pass (inseq takes that name)
    call = {"n_steps": IG_STEPS, "internal_batch_size": IG_BATCH}
    call = call if method == "integrated_gradients" else {}

    def theirs(seed: int) -> dict:
        key = (inseq_method, full, seed)
        if inseq_method == "reagent" and key in _REAGENT_RUNS:  # reagent and reagent_uniform share inseq's runs
            return _REAGENT_RUNS[key]
        r = worker.ask(op="attribute", method=inseq_method, prompt=prompt, full=full, seed=seed, init=init, args=call)
        if "error" not in r and not same_tokens(ids, r["ids"], tok.pad_token_id, n_prompt):
            r = {"error": f"inseq attributed other ids ({len(r['ids'])} vs {len(ids)})"}
        if inseq_method == "reagent":
            _REAGENT_RUNS[key] = r
        return r

    a = seeds[0]
    if order % 2 == 0:
        ours, t_ours, it_ours = run_ours(model, tok, method, ids, n_prompt, a, baseline, cfg)
        th = theirs(a)
    else:
        th = theirs(a)
        ours, t_ours, it_ours = run_ours(model, tok, method, ids, n_prompt, a, baseline, cfg)
    if "error" in th:
        return {"error": th["error"]}
    width = len(th["scores"][0])  # the positions inseq's rows cover (see same_tokens)
    row = {
        "n_tokens": len(ids), "n_prompt": n_prompt, "steps": len(ids) - n_prompt, "seconds_ours": t_ours,
        "seconds_inseq": th["seconds"], "rho": per_step_spearman([r[:width] for r in ours], th["scores"], n_prompt),
        "scores_ours": ours, "scores_inseq": th["scores"], "hidden_by_inseq": len(ids) - len(th["ids"]),
    }  # fmt: skip
    if method.startswith("reagent"):
        row["iterations_ours"], row["stopped_ours"] = it_ours
        row["iterations_inseq"], row["stopped_inseq"] = th.get("iterations"), th.get("stopped")
        row["probes"] = cfg["num_probes"]
    if method.startswith("reagent") and len(seeds) > 1:
        b = seeds[1]
        th_b = theirs(b)
        ours_b, _, _ = run_ours(model, tok, method, ids, n_prompt, b, baseline, cfg)
        if "error" not in th_b:
            row["rho_inseq_ab"] = per_step_spearman(th["scores"], th_b["scores"], n_prompt)
        row["rho_ours_ab"] = per_step_spearman(ours, ours_b, n_prompt)
    return row


def _pair(rows: list[dict], key: str) -> str:
    """ "mean / min" of the per-step correlations stored under ``key``, "-" when none."""
    mean, low, count = summarize([x for r in rows for x in r.get(key, [])])
    return f"{mean:.3f} / {low:.3f}" if count else "-"


def _steps(rows: list[dict]) -> str:
    """Median ReAGent probing steps per target token and the share of probes that stopped, kvsieve / inseq; "-" for
    the other methods."""
    ours = [x for r in rows for x in r.get("iterations_ours") or []]
    theirs = [x for r in rows for x in r.get("iterations_inseq") or []]
    if not ours or not theirs:
        return "-"
    probes = rows[0].get("probes", 1)
    share = [sum(x for r in rows for x in r.get(key) or []) / (probes * len(ours)) for key in STOPPED]
    return f"{statistics.median(ours):g} / {statistics.median(theirs):g} ({share[0]:.0%} / {share[1]:.0%} stopped)"


def table(rows: list[dict], header: dict) -> str:
    r = header["reagent"]
    lines = [
        f"SmolLM2-135M-Instruct, float32, CPU ({header['threads']} threads), inseq {header['inseq']}; "
        f"{header['examples']} examples (natural sentences + {','.join(header['tasks'])} at ~{header['length']} "
        f"tokens), up to {header['steps']} target tokens each.",
        "Same on both sides: attributed function p(target token), one attribution per target token over its context; "
        "gradients w.r.t. the input embeddings, a token's score = L2 norm over the embedding dimension (inseq's "
        f"vnorm); integrated gradients: {header['ig_steps']} Gauss-Legendre steps, inseq's baseline (UNK embedding, "
        f"EOS kept); ReAGent: rational size {r['rational_size']}, stop when the target is in the top "
        f"{r['top_k']}, replacing ratio {r['replacing_ratio']}, {r['num_probes']} probes, at most {r['max_steps']} "
        f"steps, seeds a={header['seeds'][0]} b={header['seeds'][-1]}, contexts <= {header['reagent_max_tokens']} "
        "tokens. Replacements: inseq uniform over the vocabulary (its POS sampler with one tag: nltk's tagger is a "
        "download); kvsieve `reagent` SmolLM2's own predictions, `reagent_uniform` uniform.",
        "rho = Spearman rank correlation per example and target token (mean / min over the tokens compared; a token "
        "either side scored NaN, inseq's ReAGent when none of its probes stopped, is not compared); time = median "
        "over examples of kvsieve seconds / inseq seconds (each side's attribution call alone, turns alternating).",
        "",
        "| method | examples | tokens compared | rho ours vs inseq (mean) | (min) | inseq a vs b (mean / min) "
        "| ours a vs b (mean / min) | s/example ours | s/example inseq | time ours/inseq "
        "| ReAGent steps ours / inseq |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in header["methods"]:
        done = [row for row in rows if row["method"] == method and "rho" in row]
        if not done:
            lines.append(f"| {method} | 0 | 0 | - | - | - | - | - | - | - | - |")
            continue
        mean, low, compared = summarize([x for row in done for x in row["rho"]])
        tokens = sum(len(row["rho"]) for row in done)
        ratio = statistics.median(row["seconds_ours"] / row["seconds_inseq"] for row in done)
        t_ours = statistics.median(row["seconds_ours"] for row in done)
        t_inseq = statistics.median(row["seconds_inseq"] for row in done)
        lines.append(
            f"| {method} | {len(done)} | {compared} of {tokens} | {mean:.4f} | {low:.4f} "
            f"| {_pair(done, 'rho_inseq_ab')} | {_pair(done, 'rho_ours_ab')} "
            f"| {t_ours:.2f} | {t_inseq:.2f} | {ratio:.2f} | {_steps(done)} |"
        )
    skipped = [f"{x['example']} {x['method']}: {x.get('skipped') or x.get('error')}" for x in rows if "rho" not in x]
    if skipped:
        lines += ["", "not compared: " + "; ".join(skipped)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--length", type=int, default=256, help="context tokens of the task prompts (qa: >= 200)")
    parser.add_argument("--steps", type=int, default=3, help="target tokens attributed per example")
    parser.add_argument("--tasks", default="qa,niah_single_number")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1", help="seed a (both sides), seed b (the second runs of ReAGent)")
    parser.add_argument("--reagent-max-tokens", type=int, default=96, help="ReAGent only on examples this short")
    parser.add_argument("--reagent-max-steps", type=int, default=REAGENT["max_steps"], help="both sides' cap")
    parser.add_argument("--out", default="vs-inseq-out")
    parser.add_argument("--venv", default=str(ROOT / ".venv-inseq"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"error: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.examples < 1 or args.steps < 1:
        raise SystemExit("error: --examples and --steps must be >= 1")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)

    python = ensure_venv(Path(args.venv))
    from kvsieve import load_model
    from kvsieve.models import converted_dir

    model, tok = load_model("smollm2-135m")
    tasks = args.tasks.split(",")
    exs = examples(tok, model, args.examples, args.length, args.steps, tasks)
    worker = Inseq(python, str(converted_dir("smollm2-135m")), args.threads)
    header = {
        "examples": args.examples, "length": args.length, "steps": args.steps, "tasks": tasks, "methods": methods,
        "seeds": seeds, "reagent": {**REAGENT, "max_steps": args.reagent_max_steps}, "ig_steps": IG_STEPS,
        "reagent_max_tokens": args.reagent_max_tokens,
        "threads": args.threads, "inseq": worker.version,
    }  # fmt: skip
    log = Path(args.out) / "vs_inseq.jsonl"
    done = load_log(log, header)
    rows = list(done.values())
    order = 0
    try:
        for ex in exs:
            for method in methods:
                order += 1
                if (ex[0], method) in done:
                    continue
                t0 = time.perf_counter()
                row = {
                    "example": ex[0],
                    "method": method,
                    **measure(args, model, tok, worker, ex, method, order, seeds),
                }
                rows.append(row)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rho = summarize(row.get("rho", []))[0]
                what = row.get("skipped") or row.get("error") or f"rho mean {rho:.4f}"
                print(f"{ex[0]} {method}: {what} ({time.perf_counter() - t0:.1f} s)", flush=True)
    finally:
        worker.close()
    text = table(rows, header)
    print(text)
    (Path(args.out) / "vs_inseq.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
