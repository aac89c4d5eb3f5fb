"""Issue 2 on the embedded SmolLM2-135M: exactness of `full`, and StreamingLLM's perplexity claim."""

from __future__ import annotations

import math

import pytest
import torch

from kvsieve import Sieve, generate
from kvsieve.bench.streaming import stream_nll
from kvsieve.tasks import load_haystack

PROMPT = "What is the capital of France? Answer in one sentence, then name one famous landmark there."


def test_greedy_full_equals_plain_generate(smollm2):
    model, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    plain = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    ours = generate(model, tok, ids, Sieve("full"), max_new_tokens=24)
    assert ours.new_token_ids == plain[0, ids.shape[1] :].tolist()
    assert "Paris" in ours.text
    with Sieve("full").attach(model) as cache:  # and through model.generate with the kvsieve cache
        hooked = model.generate(
            ids, max_new_tokens=24, do_sample=False, past_key_values=cache, pad_token_id=tok.eos_token_id
        )
    assert torch.equal(hooked, plain)


@pytest.fixture(scope="module")
def prose(smollm2):
    """2,000 tokens of the Python documentation's prose (CPython's pydoc_data topics), from a third of the way in."""
    _, tok = smollm2
    text = load_haystack("pydoc")
    ids = tok(text[len(text) // 3 :], add_special_tokens=False).input_ids
    return torch.tensor([ids[:2000]])


def test_streaming_llm_keeps_perplexity_and_sinks_matter(smollm2, prose):
    model, _ = smollm2
    full = stream_nll(model, prose, "full", None, chunk=prose.shape[1])
    sinks = stream_nll(model, prose, "streaming_llm", 256, chunk=32)
    window = stream_nll(model, prose, "streaming_llm(n_sink=0)", 256, chunk=32)
    ppl_full, ppl_sinks, ppl_window = full.ppl(), sinks.ppl(), window.ppl()
    print(f"perplexity over 2,000 tokens: full {ppl_full:.2f}, sinks+window {ppl_sinks:.2f}, window {ppl_window:.2f}")
    assert sinks.kv_tokens == window.kv_tokens == 256
    assert math.isfinite(ppl_sinks)
    assert ppl_sinks <= 1.15 * ppl_full
    assert ppl_window >= 1.25 * ppl_sinks  # without the sinks the same budget is measurably worse
