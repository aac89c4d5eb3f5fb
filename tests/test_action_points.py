"""The attention-compute and sequence action points: exact references, real savings, composition, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, build, list_methods
from kvsieve.attention import AttentionCall, block_sparse, causal_allowed, dense, sdpa_output
from tiny_models import ARCHS, make_model, prompt_ids


def run(model, cache, ids, steps=3):
    out = []
    with torch.no_grad():
        out.append(model(ids, past_key_values=cache).logits[:, -1])
        for _ in range(steps):
            out.append(model(out[-1].argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1])
    return out


# every sparse prefill method's spec that computes every causal block (its density or threshold at 1): must equal
# dense; a prefill method not listed here is run with its defaults, which must then be neutral
FULL_DENSITY = {
    "dense": "dense",
    "oracle_topk": "oracle_topk(block_size={block}, density=1.0)",
    "flexprefill": "flexprefill(block_size={block}, gamma=1.0)",
    "xattention": "xattention(block_size={block}, stride=1, threshold=1.0)",
    "minference": "minference(block_size={block}, vertical=1.0, slash=1.0)",
    "anchor_attention": "anchor_attention(block_size={block}, theta=1e9)",
    "pbs_attention": "pbs_attention(block_size={block}, segment_size={block}, threshold=1.0)",
    "power_attention": "power_attention(block_size={block}, window=1000000)",
    "hip": "hip(block_size={block}, top_k=1000000)",
}


# --- attention compute --------------------------------------------------------------------------------------------
class _Attention(torch.nn.Module):
    num_key_value_groups, is_causal, layer_idx = 3, True, 0


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_packed_decoding_equals_sdpa_over_repeated_heads(masked, biased):
    """The packed decoding route (query heads as rows of their KV head) computes sdpa_output's attention."""
    torch.manual_seed(0)
    b, h, g, t, d = 2, 3, 3, 700, 16
    query, keys, values = torch.randn(b, h * g, 1, d), torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    valid = torch.rand(b, h, t) > 0.3 if masked else None
    allowed = causal_allowed(1, t, valid) if masked or biased else None
    bias = torch.randn(b, h * g, 1, t) if biased else None
    ref = sdpa_output(_Attention(), query, keys, values, allowed, d**-0.5, bias=bias)
    got = sdpa_output(_Attention(), query, keys, values, allowed, d**-0.5, bias=bias, packed=True)
    assert got.shape == ref.shape == (b, 1, h * g, d)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_through_the_action_point_is_bitwise_the_default(arch):
    model = make_model(arch)
    ids = prompt_ids(70)
    ref = run(model, DynamicCache(config=model.config), ids)
    with Sieve("full", prefill="dense").attach(model) as cache:
        assert all(torch.equal(a, b) for a, b in zip(ref, run(model, cache, ids), strict=True))
    with Sieve("knorm", compression=0.5).attach(model) as cache:
        a = run(model, cache, ids)
    with Sieve("knorm", compression=0.5, prefill="dense").attach(model) as cache:
        assert all(torch.equal(x, y) for x, y in zip(a, run(model, cache, ids), strict=True))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block", [16, 7])
def test_every_prefill_method_at_full_density_equals_dense_attention(arch, block):
    model = make_model(arch)
    ids = prompt_ids(70)
    ref = run(model, DynamicCache(config=model.config), ids)
    for cls in list_methods("prefill"):
        spec = FULL_DENSITY.get(cls.name, cls.name).format(block=block)  # unlisted: neutral by default (pine)
        with Sieve("full", prefill=spec).attach(model) as cache:
            got = run(model, cache, ids)
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _call(q=40, t=40, h=2, g=2, d=8, seed=0, valid=None):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, h * g, q, d, generator=gen)
    keys, values = torch.randn(1, h, t, d, generator=gen), torch.randn(1, h, t, d, generator=gen)
    positions = torch.arange(t).expand(1, h, t)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = g, True  # what transformers' sdpa function reads
    return AttentionCall(module, query, keys, values, valid, positions, d**-0.5)


def _reference(call, blocks, bs):
    """Eager attention with the block mask, the causal mask and every query's own slot, from the definition."""
    _, hq, q, _ = call.query.shape
    h, t = call.keys.shape[1], call.keys.shape[2]
    k = call.keys.repeat_interleave(hq // h, dim=1)
    v = call.values.repeat_interleave(hq // h, dim=1)
    allowed = causal_allowed(q, t, call.valid).repeat_interleave(hq // h, dim=1) if call.valid is not None else (
        causal_allowed(q, t, None))  # fmt: skip
    per_slot = blocks.repeat_interleave(bs, dim=-2)[..., :q, :].repeat_interleave(bs, dim=-1)[..., :t]
    own = torch.zeros(q, t, dtype=torch.bool)
    own[torch.arange(q), torch.arange(t - q, t)] = True
    # the key blocks that hold a query block's own tokens are computed for all its rows (the diagonal)
    first = (t - q + (torch.arange(q) // bs) * bs) // bs
    last = (t - q + torch.clamp((torch.arange(q) // bs + 1) * bs, max=q) - 1) // bs
    key_block = torch.arange(t)[None, :] // bs
    diag = (key_block >= first[:, None]) & (key_block <= last[:, None])
    mask = allowed & (per_slot | diag | own)
    logits = (call.query @ k.transpose(-1, -2)) * call.scaling
    return (logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("t,q", [(40, 40), (50, 30)])
def test_block_sparse_computes_what_the_block_mask_says(t, q):
    call = _call(q=q, t=t)
    bs = 8
    nq, nk = -(-q // bs), -(-t // bs)
    blocks = torch.rand(1, 4, nq, nk, generator=torch.Generator().manual_seed(3)) > 0.5
    torch.testing.assert_close(block_sparse(call, blocks, bs), _reference(call, blocks, bs), rtol=1e-5, atol=1e-6)
    everything = torch.ones(1, 4, nq, nk, dtype=torch.bool)
    torch.testing.assert_close(block_sparse(call, everything, bs), dense(call), rtol=1e-5, atol=1e-6)


def test_block_sparse_skips_the_blocks_it_does_not_select(monkeypatch):
    """The work follows the selection: each query block's sdpa sees only the key blocks some head selected."""
    call = _call(q=64, t=64)
    bs = 16
    blocks = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    blocks[..., 0] = True  # every query block: the first key block (+ its own diagonal block, always)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, *a, **kw):
        seen.append(k.shape[2])
        return real(q, k, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    block_sparse(call, blocks, bs)
    assert seen == [16, 32, 32, 32]  # dense would be 16, 32, 48, 64: 112 of 160 key rows


def test_oracle_topk_below_full_density_changes_the_output_and_composes_with_eviction(llama):
    ids = prompt_ids(80)
    ref = run(llama, DynamicCache(config=llama.config), ids)
    with Sieve("full", prefill="oracle_topk(block_size=8, density=0.3)").attach(llama) as cache:
        sparse = run(llama, cache, ids)
    assert not torch.equal(ref[0], sparse[0])
    with Sieve("snapkv", compression=0.5, prefill="oracle_topk(block_size=8, density=0.3)").attach(llama) as cache:
        run(llama, cache, ids)
    assert cache.kv_tokens() == [40 + 3, 40 + 3]  # the eviction budget holds with a sparse prefill


def test_prefill_specs_are_checked_for_their_kind():
    with pytest.raises(KVSieveError, match="not a prefill method"):
        Sieve("full", prefill="snapkv")
    with pytest.raises(KVSieveError, match="not a cache method"):
        Sieve("oracle_topk")
    with pytest.raises(KVSieveError, match=r"density must be <= 1\.0"):
        build("oracle_topk(density=1.5)")


# --- sequence -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_keeping_every_token_is_bitwise_no_pruning(arch):
    model = make_model(arch)
    ids = prompt_ids(50)
    ref = run(model, DynamicCache(config=model.config), ids)
    with Sieve("full", sequence="fastv(layer=0, keep=1.0)").attach(model) as cache:
        assert all(torch.equal(a, b) for a, b in zip(ref, run(model, cache, ids), strict=True))
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks gone with the block


def test_pruned_layers_compute_and_cache_only_the_kept_tokens(llama):
    ids = prompt_ids(50)
    rows = {}
    layers = llama.model.layers
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: rows.setdefault(i, []).append(o.shape[1]))
        for i, layer in enumerate(layers)
    ]
    try:
        with Sieve("full", sequence="fastv(layer=0, keep=0.5)").attach(llama) as cache, torch.no_grad():
            logits = llama(ids, past_key_values=cache).logits
            positions = cache.layers[1].segments[0].positions[0, 0]
            llama(logits[:, -1:].argmax(-1), past_key_values=cache)
    finally:
        for h in handles:
            h.remove()
    assert rows[0] == [50, 1] and rows[1] == [25, 1]  # layer 1 computed 25 rows at the prompt
    assert logits.shape[1] == 25  # one output row per kept token; the last is the last token's
    assert cache.kv_tokens() == [51, 26]
    assert positions[-1] == 49 and bool((positions[1:] > positions[:-1]).all())  # original positions, in order
    # the kept tokens are the top half by the last query's attention at layer 0 (checked against a manual pass)


def test_pruned_generation_runs_through_generate_and_matches_a_manual_rerun(llama):
    ids = prompt_ids(40)
    with Sieve("full", sequence="fastv(layer=0, keep=0.5)").attach(llama) as cache:
        out = llama.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 45)


def test_fastv_composes_with_a_cache_method(llama):
    ids = prompt_ids(60)
    with Sieve("snapkv", compression=0.5, sequence="fastv(layer=0, keep=0.5)").attach(llama) as cache:
        run(llama, cache, ids, steps=2)
    assert cache.kv_tokens() == [30 + 2, 15 + 2]  # layer 1 saw 30 tokens and kept half of them


def test_sequence_errors_before_any_work():
    gemma = make_model("gemma3")
    llama = make_model("llama")
    with (
        pytest.raises(KVSieveError, match="layer 5 leaves no decoder layer"),
        Sieve("full", sequence="fastv(layer=5)").attach(llama),
    ):
        pass
    with Sieve("full", sequence="fastv(layer=0, keep=0.5)").attach(gemma) as cache:  # sliding layers follow the rows
        gemma(prompt_ids(30), past_key_values=cache)
    assert cache.kv_tokens() == [7, 15, 7, 15]  # window 8: the sliding layers hold 7; layer 1 on holds the kept rows
    with (
        pytest.raises(KVSieveError, match="re-indexing"),
        Sieve("streaming_llm", budget=16, sequence="fastv(layer=0)").attach(llama),
    ):
        pass
    with pytest.raises(KVSieveError, match="not a sequence method"):
        Sieve("full", sequence="snapkv")
    with pytest.raises(KVSieveError, match=r"keep must be <= 1\.0"):
        build("fastv(keep=2.0)")
    ids = prompt_ids(20, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with Sieve("full", sequence="fastv(layer=0)").attach(llama) as cache, pytest.raises(KVSieveError, match="padded"):
        llama(ids, attention_mask=mask, past_key_values=cache)
