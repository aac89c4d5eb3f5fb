"""The cache, the attention hook and the budget on tiny random-weight models of four architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import kvsieve
from kvsieve import Sieve, prefill, rope
from kvsieve.cache import SieveLayer
from kvsieve.methods.base import top_slots
from kvsieve.rope import find_inv_freq as inv_freq
from kvsieve.storage import max_spare
from tiny_models import make_model, prompt_ids

# the issue-2 evicting methods; later methods test their own budget rules (head-wise methods keep heads whole)
EVICTING = ["a2sf", "h2o", "knorm", "random", "snapkv", "streaming_llm", "tova"]


def run_steps(model, cache, ids: torch.Tensor, steps: int = 5, chunk: int | None = None) -> list[torch.Tensor]:
    """Prefill then greedy-decode ``steps`` tokens; returns the logits of each forward pass."""
    out = []
    n = ids.shape[1]
    step = n if chunk is None else chunk
    with torch.no_grad():
        for start in range(0, n, step):
            logits = model(ids[:, start : start + step], past_key_values=cache, use_cache=True).logits
            out.append(logits)
        for _ in range(steps):
            nxt = out[-1][:, -1:].argmax(-1)
            out.append(model(nxt, past_key_values=cache, use_cache=True).logits)
    return out


def baseline(model, ids, steps=5, chunk=None):
    return run_steps(model, DynamicCache(config=model.config), ids, steps, chunk)


@pytest.mark.parametrize("method", ["full", "snapkv", "h2o", "knorm", "streaming_llm", "streaming_llm(rerotate=False)"])
def test_compression_zero_is_bitwise_baseline(arch_model, method):
    if method == "streaming_llm" and arch_model.config.model_type == "gemma3_text":
        pytest.skip("re-rotation needs all-global layers; Gemma 3 refuses it (tested in test_errors)")
    ids = prompt_ids(40)
    ref = baseline(arch_model, ids)
    sieve = Sieve(method, compression=0.0) if method != "full" else Sieve("full")
    with sieve.attach(arch_model) as cache:
        got = run_steps(arch_model, cache, ids)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_chunked_prefill_full_equals_chunked_baseline(arch_model):
    ids = prompt_ids(48)
    ref = baseline(arch_model, ids, chunk=16)
    with Sieve("full").attach(arch_model) as cache:
        got = run_steps(arch_model, cache, ids, chunk=16)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_generate_with_full_equals_plain_generate(arch_model):
    ids = prompt_ids(30)
    plain = arch_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with Sieve("full").attach(arch_model) as cache:
        ours = arch_model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert torch.equal(plain, ours)


@pytest.mark.parametrize("method", EVICTING)
def test_token_budget_holds_at_every_step(arch_model, method):
    budget = 12
    ids = prompt_ids(40)
    if method == "streaming_llm" and arch_model.config.model_type == "gemma3_text":
        method = "streaming_llm(rerotate=False)"  # re-rotation needs all-global layers (tested in test_errors)
    with Sieve(method, budget=budget, interval=1).attach(arch_model) as cache, torch.no_grad():
        arch_model(ids[:, :20], past_key_values=cache)
        assert all(layer.length == budget for layer in cache.sieve_layers())
        for _ in range(6):
            arch_model(ids[:, :1], past_key_values=cache)
            for layer in cache.sieve_layers():
                assert layer.tokens_per_head() == [budget] * layer.n_kv_heads
    # sliding layers keep transformers' own behaviour: at most a window of tokens
    for layer in cache.layers:
        if not isinstance(layer, SieveLayer):
            assert layer.keys.shape[2] <= layer.sliding_window


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_compression_ratio_compresses_the_prompt_then_decoding_appends(llama, ratio):
    ids = prompt_ids(64)
    with Sieve("snapkv", compression=ratio).attach(llama) as cache, torch.no_grad():
        logits = llama(ids, past_key_values=cache).logits
        assert cache.kv_tokens() == [int(64 * (1 - ratio))] * 2
        for step in range(1, 5):
            llama(logits[:, -1:].argmax(-1), past_key_values=cache)
            assert cache.kv_tokens() == [int(64 * (1 - ratio)) + step] * 2


@pytest.mark.parametrize("interval", [1, 4, 7])
def test_periodic_budget_holds_at_most_budget_plus_interval_minus_one(llama, interval):
    budget = 16
    with Sieve("h2o", budget=budget, interval=interval).attach(llama) as cache, torch.no_grad():
        logits = llama(prompt_ids(40), past_key_values=cache).logits
        assert cache.kv_tokens() == [budget] * 2  # a prefill pass always compresses
        held = []
        for _ in range(30):
            logits = llama(logits[:, -1:].argmax(-1), past_key_values=cache).logits
            held.append(cache.kv_tokens()[0])
    assert max(held) == budget + interval - 1 and min(held) == budget
    # evictions come every `interval` steps: the held count climbs budget .. budget + interval - 1, then drops
    assert (
        held[: 2 * interval]
        == [budget + i for i in range(1, interval)]
        + [budget]
        + ([budget + i for i in range(1, interval)] + [budget])[: 2 * interval - interval]
    )


def test_kv_bytes_are_real(llama):
    """A cache that claims a budget holds only that many tokens' tensors, in storage it owns."""
    budget, ids = 16, prompt_ids(64)
    with Sieve("h2o", budget=budget).attach(llama) as cache, torch.no_grad():
        llama(ids, past_key_values=cache)
    cfg = llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = budget * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 4
    assert cache.kv_bytes() == expected
    for layer in cache.sieve_layers():
        for seg in layer.segments:
            for t in (seg.keys, seg.values):  # the buffers' spare room is bounded (see kvsieve.storage)
                slots = t.untyped_storage().nbytes() // (t.nelement() * t.element_size() // seg.length)
                assert seg.length <= slots <= seg.length + max_spare(seg.length)
    assert cache.kv_bytes() <= cache.reserved_kv_bytes() <= expected * 1.25 + 32 * 2 * 2 * head_dim * 2 * 4


def test_headwise_budget_frees_memory_per_head(llama):
    budget, ids = 10, prompt_ids(64)
    with Sieve("adakv:snapkv", budget=budget, interval=1).attach(llama) as cache, torch.no_grad():
        logits = llama(ids, past_key_values=cache).logits
        llama(logits[:, -1:].argmax(-1), past_key_values=cache)
    heads = llama.config.num_key_value_heads
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    total = 0
    for layer in cache.sieve_layers():
        per_head = layer.tokens_per_head()
        assert sum(per_head) == budget * heads  # the layer's budget, split across heads
        for seg in layer.segments:  # per-head buffers: each head's storage is its own
            for t in (seg.keys, seg.values):
                slots = t.untyped_storage().nbytes() // (t.nelement() * t.element_size() // seg.length)
                assert seg.length <= slots <= seg.length + max_spare(seg.length)
        total += sum(per_head)
    assert cache.kv_bytes() == total * head_dim * 2 * 4


class Spy(kvsieve.Method):
    """Records what the wrapped method scored, to check the policy kept exactly its top-k."""

    name = "spy"

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.rerotate = inner.rerotate

    def attention_request(self, evicting):
        return self.inner.attention_request(evicting)

    def observe(self, obs):
        self.inner.observe(obs)

    def score(self, obs):
        s = self.inner.score(obs)
        self.seen.append((obs.layer_idx, obs.positions.clone(), s.clone()))
        return s

    def spec(self):
        return "spy"

    own_kind = "evict"


@pytest.mark.parametrize("method", ["snapkv", "h2o", "a2sf", "tova", "knorm", "random", "streaming_llm"])
def test_kept_tokens_are_the_top_k_of_the_score(llama, method):
    spy = Spy(kvsieve.build(method))
    budget = 20
    with Sieve(spy, budget=budget).attach(llama) as cache, torch.no_grad():
        llama(prompt_ids(50), past_key_values=cache)
    assert len(spy.seen) == 2
    for layer_idx, positions, scores in spy.seen:
        expected = positions.gather(-1, top_slots(scores, budget)).sort(-1).values
        assert torch.equal(cache.layers[layer_idx].segments[0].positions.sort(-1).values, expected)


def test_streaming_20k_tokens_keeps_cache_size_constant():
    model = make_model("llama", max_positions=256)  # a window far shorter than the stream
    budget, chunk = 64, 100
    ids = prompt_ids(20_000, seed=3)
    sizes = set()
    with Sieve("streaming_llm", budget=budget).attach(model) as cache, torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            logits = model(ids[:, start : start + chunk], past_key_values=cache).logits
            if start + chunk >= budget:  # full from the second chunk on
                sizes.add(tuple(cache.kv_tokens()))
                assert cache.kv_bytes() == budget * 2 * 2 * 16 * 2 * 4
    assert sizes == {(budget, budget)}
    assert torch.isfinite(logits).all()
    layer = cache.layers[0]
    assert layer.seen == 20_000 and cache.get_seq_length() == 20_000  # stream positions; distances within the cache
    seg = layer.segments[0]
    assert seg.positions[0, 0].sort().values[:4].tolist() == [0, 1, 2, 3]  # the sinks survive...
    sinks = seg.positions < 4
    assert bool((seg.shift[sinks] == 20_000 - budget).all()) and bool((seg.shift[~sinks] == 0).all())  # ...shifted


def test_rerotated_keys_match_a_fresh_run_on_the_kept_tokens():
    """Layer 0's keys depend only on token and position, so after StreamingLLM eviction they must equal the keys
    of the kept tokens run afresh at positions 0..k-1."""
    model = make_model("llama")
    ids = prompt_ids(40)
    with Sieve("streaming_llm(n_sink=2)", budget=12).attach(model) as cache, torch.no_grad():
        model(ids, past_key_values=cache)
        layer = cache.layers[0]
        seg = layer.segments[0]
        with layer.attention_view(seg) as (keys, _):
            got = keys.clone()
        kept = seg.positions[0, 0]
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, kept], past_key_values=fresh)
    assert kept.tolist() == [0, 1, *range(30, 40)]
    # RoPE only sees distances: our keys are the fresh run's keys (positions 0..11) moved by the 28 evicted tokens
    evicted = 40 - 12
    torch.testing.assert_close(got, rope.rotate(fresh.layers[0].keys, torch.tensor(evicted), inv_freq(model)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with Sieve("streaming_llm(n_sink=2)", budget=12).attach(model) as cache, torch.no_grad():
        model(ids, past_key_values=cache)
        assert torch.equal(cache.layers[0].segments[0].keys[:, :, 2:], got[:, :, 2:])  # unmoved keys: bit for bit


@pytest.mark.parametrize("method", ["random(seed=3)", "snapkv", "a2sf"])
def test_two_identical_runs_are_identical(llama, method):
    def once():
        with Sieve(method, compression=0.5).attach(llama) as cache:
            logits = run_steps(llama, cache, prompt_ids(40), steps=4)
            return logits, [layer.segments[0].positions.clone() for layer in cache.sieve_layers()]

    (a, pa), (b, pb) = once(), once()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def test_leaving_the_context_restores_the_model(llama):
    ids = prompt_ids(20)
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    config = llama.config.to_dict()
    with torch.no_grad():
        before = llama(ids).logits
    with Sieve("snapkv", compression=0.5).attach(llama) as cache:
        assert llama.config._attn_implementation == "kvsieve"
        with torch.no_grad():
            llama(ids, past_key_values=cache)
    assert llama.config._attn_implementation == "sdpa"
    assert llama.config.to_dict() == config
    assert "kvsieve" not in AttentionInterface._global_mapping
    assert "kvsieve" not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    assert all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)


def test_context_is_restored_after_an_error(llama):
    with pytest.raises(RuntimeError, match="boom"), Sieve("knorm", budget=8).attach(llama):
        raise RuntimeError("boom")
    assert llama.config._attn_implementation == "sdpa"
    assert "kvsieve" not in AttentionInterface._global_mapping


def test_forward_without_the_kvsieve_cache_is_an_error(llama):
    with Sieve("knorm", budget=8).attach(llama), pytest.raises(kvsieve.KVSieveError, match="the cache that"):
        llama(prompt_ids(10), past_key_values=DynamicCache(config=llama.config))


def test_batch_with_left_padding_matches_plain_generate(llama):
    ids = prompt_ids(24, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # left padding on the second row
    plain = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with Sieve("full").attach(llama) as cache:
        ours = llama.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, past_key_values=cache
        )
    assert torch.equal(plain, ours)


def test_batch_with_left_padding_evicts_padding_first(llama):
    ids = prompt_ids(24, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    with Sieve("knorm", budget=16, interval=1).attach(llama) as cache:
        out = llama.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, past_key_values=cache
        )
    assert out.shape == (2, 28)
    for layer in cache.sieve_layers():
        seg = layer.segments[0]
        assert seg.valid is None  # 17 real tokens in row 2 > 16 kept: every padding token went first
        assert layer.length == 16


def test_chunked_prefill_bounds_the_cache(llama):
    ids = prompt_ids(200)
    peak = 0

    class Watch(kvsieve.Method):
        name = "watch"

    with Sieve("h2o", budget=32).attach(llama) as cache:
        original = SieveLayer.commit

        def spy(self, *a, **k):
            nonlocal peak
            original(self, *a, **k)
            peak = max(peak, self.length)

        SieveLayer.commit = spy
        try:
            prefill(llama, ids, cache, chunk_size=25)
        finally:
            SieveLayer.commit = original
    assert peak == 32 + 25
    assert cache.kv_tokens() == [32, 32]


def test_merge_runs_per_head_when_a_headwise_policy_splits_the_layer(llama):
    """A method that both allocates per head and merges gets ``merge`` once per KV head on the splitting eviction."""
    from kvsieve.methods.adakv import AdaKV

    calls = []

    class MergingAdaKV(AdaKV):
        def merge(self, obs, keep):
            calls.append((obs.head_start, obs.keys.shape[1], keep.shape))
            keys = obs.keys.gather(2, keep[..., None].expand(-1, -1, -1, obs.keys.shape[-1])) * 0 + 1.0
            values = obs.values.gather(2, keep[..., None].expand(-1, -1, -1, obs.values.shape[-1]))
            return keys, values

    method = MergingAdaKV(inner=kvsieve.build("snapkv"))
    with Sieve(method, budget=8).attach(llama) as cache, torch.no_grad():
        llama(prompt_ids(40), past_key_values=cache)
    assert [c[:2] for c in calls] == [(0, 1), (1, 1)] * 2  # two layers, two KV heads each
    for layer in cache.sieve_layers():
        assert len(layer.segments) == 2
        assert all(bool((seg.keys == 1.0).all()) for seg in layer.segments)  # the merged keys were written


def test_checkpoint_restore_returns_to_the_compressed_context(llama):
    """Several questions over one compressed context: each starts from exactly the same cache."""
    ids, q1, q2 = prompt_ids(40), prompt_ids(5, seed=7), prompt_ids(4, seed=8)
    with Sieve("h2o", compression=0.5).attach(llama) as cache, torch.no_grad():
        llama(ids, past_key_values=cache)
        mark = cache.checkpoint()
        before = [(s.keys.clone(), s.positions.clone(), {k: v.clone() for k, v in s.state.items()})
                  for layer in cache.sieve_layers() for s in layer.segments]  # fmt: skip
        with cache.paused():
            first = llama(q2, past_key_values=cache).logits
            llama(q1, past_key_values=cache)  # another question, then its answer...
        cache.restore(mark)
        after = [(s.keys, s.positions, s.state) for layer in cache.sieve_layers() for s in layer.segments]
        for (k0, p0, s0), (k1, p1, s1) in zip(before, after, strict=True):
            assert torch.equal(k0, k1) and torch.equal(p0, p1) and all(torch.equal(s0[n], s1[n]) for n in s0)
        with cache.paused():
            again = llama(q2, past_key_values=cache).logits
    assert torch.equal(first, again)
    with Sieve("h2o", budget=16, interval=1).attach(llama) as cache, torch.no_grad():
        llama(ids, past_key_values=cache)
        mark = cache.checkpoint()
        llama(q1[:, :1], past_key_values=cache)  # evicts: the checkpoint no longer holds
        with pytest.raises(kvsieve.KVSieveError, match="evicted tokens after the checkpoint"):
            cache.restore(mark)


def test_a_cache_continues_in_a_later_block_of_its_sieve(llama):
    sieve = Sieve("snapkv", compression=0.5)
    ids = prompt_ids(30)
    with sieve.attach(llama) as cache, torch.no_grad():
        llama(ids[:, :20], past_key_values=cache)
    with sieve.attach(llama, cache=cache) as again, torch.no_grad():
        assert again is cache
        llama(ids[:, 20:], past_key_values=again)
    assert cache.kv_tokens() == [15, 15]  # int(30 x 0.5) after the second prefill pass
    with (
        sieve.attach(llama) as busy,
        pytest.raises(kvsieve.KVSieveError, match="in use"),
        sieve.attach(llama, cache=busy),
    ):
        pass
