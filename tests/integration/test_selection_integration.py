"""Selective reads on the embedded SmolLM2-135M: exact at a budget covering the context, working at a small one."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsieve import Sieve, attention
from kvsieve.methods import build
from kvsieve.sieve import Budget
from kvsieve.snapshot import PrefillSnapshot
from kvsieve.tasks import get_task

METHODS = ["tokenselect", "quest", "tidaldecode", "recycled_attention"]


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding one token is latency-bound: one thread avoids OpenMP hand-offs on a small shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def greedy(model, cache, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` then decode ``steps`` greedy tokens; the last-position logits of every pass."""
    out = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        out.append(logits)
        for _ in range(steps):
            logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits)
    return out


def test_budget_covering_the_context_equals_full_attention(smollm2):
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt").input_ids[:, :200]
    ref = greedy(model, DynamicCache(config=model.config), ids, 6)
    for spec in METHODS:
        with Sieve(spec, budget=206).attach(model) as cache:  # 200 prompt + 6 decoded tokens
            got = greedy(model, cache, ids, 6)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), spec


def test_small_read_budget_on_a_2k_passkey_prompt(smollm2):
    model, tok = smollm2
    sample = get_task("passkey").generate(tok, length=2000, n=1, seed=0)[0]
    ids = tok(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    composed = build("quest(read_budget=256):snapkv")
    snapshot = PrefillSnapshot(model, ids, [composed])  # one prefill for every method
    eos = tok.eos_token_id
    original = attention.sdpa_output
    for spec in [*METHODS, composed.spec()]:
        method = build(spec)
        evicting = Budget(compression=0.5) if method.evicts else None  # composed: snapkv keeps half, quest reads 256
        sieve = Sieve(method, compression=0.5) if evicting else Sieve(method, budget=256)
        with sieve.attach(model):
            cache = snapshot.compress(method, evicting)
        reads: list[int] = []

        def spy(module, query, keys, *args, reads=reads, **kwargs):
            reads.append(keys.shape[2])
            return original(module, query, keys, *args, **kwargs)

        logits, new = snapshot.last_logits, []
        attention.sdpa_output = spy
        try:
            with sieve.attach(model, cache=cache), torch.no_grad():
                for _ in range(6):
                    new.append(int(logits.argmax(-1)))
                    step = torch.tensor([[new[-1]]])
                    logits = model(step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        finally:
            attention.sdpa_output = original
        text = tok.decode([t for t in new if t != eos], skip_special_tokens=True)
        assert text.strip(), spec
        assert torch.isfinite(logits).all()
        # most calls read the budget; dense and selection layers, and full steps, read everything
        assert sorted(reads)[len(reads) // 2] <= 256, spec
        # the cache is kept (composed: snapkv compressed the prompt to half, then decoding appended)
        assert cache.kv_tokens()[5] == (ids.shape[1] // 2 + 6 if evicting else ids.shape[1] + 6)
