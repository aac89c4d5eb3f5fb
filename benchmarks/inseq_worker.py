"""Runs inside the inseq virtual environment (see vs_inseq.py): a long-lived process that answers one JSON request per
line on stdin with one JSON line on its reply channel (the original stdout; everything else inseq prints goes to
stderr), so that vs_inseq.py can interleave the two sides' timed runs example by example.

Usage: python inseq_worker.py MODEL_DIR THREADS

Requests:
- ``{"op": "attribute", "method": ..., "prompt": ..., "full": ..., "seed": ..., "init": {...}, "args": {...}}``:
  ``inseq`` attribution of ``full`` (the prompt plus its target continuation: constrained decoding) with
  ``method`` built with ``init`` (e.g. ReAGent's hyperparameters) and called with ``args`` (e.g. ``n_steps``).
  ``torch.manual_seed(seed)`` runs first (ReAGent draws from torch's global generator). Reply: ``scores``
  (``[step][position]``, inseq's raw attributions with its default ``vnorm`` aggregation, the L2 norm over the
  embedding dimension, without its sum-to-one normalisation; None past each step's context), ``ids`` (the token ids
  inseq attributed), ``seconds`` (the ``attribute`` call alone), ``iterations`` and ``stopped`` (ReAGent's probing
  steps and the probes that met its stopping condition, per target token, read by a wrapper around inseq's
  evaluator: inseq averages the stopped probes only, so a token none stopped for scores NaN, sent as None).
- ``{"op": "baseline", "full": ...}``: the baseline token ids inseq's integrated gradients uses for ``full``.

ReAGent's token sampler: inseq's ``POSTagTokenSampler`` maps the vocabulary to part-of-speech tags with nltk's
perceptron tagger, whose data nltk downloads at run time (unreachable here). The worker gives the sampler a one-tag
mapping instead (every token shares one tag), so inseq's own code draws replacements uniformly over the vocabulary;
everything else is inseq's code unchanged. Imports nothing from kvsieve.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from importlib.metadata import version

import inseq
import torch
from inseq.attr.feat.ops.reagent_core import importance_score_evaluator, token_sampler
from transformers import AutoModelForCausalLM, AutoTokenizer


def _one_tag(cache_dir, cache_filename, save_cache=True, overwrite_cache=False, *, tokenizer, **_):
    """Replaces nltk's part-of-speech mapping (a download): one tag for the whole vocabulary."""
    return {"ANY": list(range(tokenizer.vocab_size))}


token_sampler.POSTagTokenSampler.build_pos_mapping_from_vocab = staticmethod(_one_tag)
ITERATIONS: list[int] = []  # ReAGent's probing steps per target token of the last request (read, not changed)
STOPPED: list[int] = []  # and its probes that stopped
_evaluate = importance_score_evaluator.DeltaProbImportanceScoreEvaluator.__call__


def _counting(self, *args, **kwargs):
    out = _evaluate(self, *args, **kwargs)
    ITERATIONS.append(int(self.num_steps))
    STOPPED.append(int(self.stop_mask.sum()))
    return out


importance_score_evaluator.DeltaProbImportanceScoreEvaluator.__call__ = _counting


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else x


class Worker:
    def __init__(self, model_dir: str) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = inseq.load_model(model, "saliency", tokenizer=tokenizer)
        self.current: tuple[str, str] = ("saliency", "{}")

    def use(self, method: str, init: dict) -> None:
        """Makes ``method`` (built with ``init``) the model's attribution method; outside the timed call."""
        key = (method, json.dumps(init, sort_keys=True))
        if key != self.current:
            self.model.get_attribution_method(method, override_default_attribution=True, **init)
            self.current = key

    def attribute(self, req: dict) -> dict:
        self.use(req["method"], req.get("init", {}))
        torch.manual_seed(int(req.get("seed", 0)))
        ITERATIONS.clear()
        STOPPED.clear()
        t0 = time.perf_counter()
        out = self.model.attribute(req["prompt"], req["full"], show_progress=False, **req.get("args", {}))
        seconds = time.perf_counter() - t0
        seq = out.sequence_attributions[0]
        scores = seq.target_attributions.float()
        if scores.dim() == 3:  # (positions, steps, embedding): inseq's default vnorm aggregation
            scores = torch.linalg.vector_norm(scores, ord=2, dim=-1)
        rows = [[_clean(float(x)) for x in col] for col in scores.T.tolist()]
        ids = [int(t.id) for t in seq.target]
        return {
            "scores": rows,
            "ids": ids,
            "seconds": seconds,
            "iterations": list(ITERATIONS),
            "stopped": list(STOPPED),
        }

    def baseline(self, req: dict) -> dict:
        enc = self.model.encode(req["full"], return_baseline=True)
        return {"ids": enc.input_ids[0].tolist(), "baseline_ids": enc.baseline_ids[0].tolist()}


def main() -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever inseq or transformers prints goes to stderr; replies keep their own channel
    torch.set_num_threads(int(sys.argv[2]))
    worker = Worker(sys.argv[1])
    reply.write(json.dumps({"ready": True, "inseq": version("inseq")}) + "\n")
    reply.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            result = worker.attribute(req) if req["op"] == "attribute" else worker.baseline(req)
        except Exception as err:  # reported by vs_inseq.py; the next request still runs
            result = {"error": f"{type(err).__name__}: {err}"[:300]}
        reply.write(json.dumps(result) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
