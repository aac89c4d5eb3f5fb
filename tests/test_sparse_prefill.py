"""Sparse prefill (issue 10): kernels against references written from the definitions, each method's selection
against its paper's formula, statistics, profiles, layer types, composition and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvsieve import KVSieveError, Sieve, build, sparse
from kvsieve.attention import AttentionCall, causal_allowed
from kvsieve.bench.summary import prefill_table
from kvsieve.methods import minference
from kvsieve.methods.flexprefill import js_distance
from kvsieve.methods.hip import hierarchical_top_k
from kvsieve.methods.pbs_attention import segment_permutation
from kvsieve.methods.power_attention import power_pattern
from kvsieve.methods.xattention import antidiagonal_scores
from tiny_models import make_model, prompt_ids

SPARSE_SPECS = [
    "flexprefill(block_size=8, gamma=0.6)",
    "xattention(block_size=8, stride=4, threshold=0.6)",
    "minference(block_size=8, vertical=0.05, slash=0.05)",
    "anchor_attention(block_size=8, theta=0.03)",  # the tiny random model's logits are within ~0.1 of each other
    "pbs_attention(block_size=8, segment_size=16, threshold=0.5)",
    "power_attention(block_size=8)",
    "hip(block_size=8, top_k=2)",
    "oracle_topk(block_size=8, density=0.3)",
]


def _call(q=64, t=64, h=2, g=2, d=8, seed=0, valid=None) -> AttentionCall:
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, h * g, q, d, generator=gen)
    keys, values = torch.randn(1, h, t, d, generator=gen), torch.randn(1, h, t, d, generator=gen)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = g, True
    return AttentionCall(module, query, keys, values, valid, torch.arange(t).expand(1, h, t), d**-0.5)


def _masked(call: AttentionCall, mask: torch.Tensor) -> torch.Tensor:
    """Eager attention with a token mask ``(B, Hq, q, T)`` (and the causal mask), from the definition."""
    hq, h = call.query.shape[1], call.keys.shape[1]
    k = call.keys.repeat_interleave(hq // h, 1)
    v = call.values.repeat_interleave(hq // h, 1)
    mask = mask & causal_allowed(call.n_new, call.keys.shape[2], None)
    logits = (call.query @ k.transpose(-1, -2)) * call.scaling
    return (logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def _token_mask(blocks: torch.Tensor, bs: int, q: int, t: int) -> torch.Tensor:
    per = blocks.repeat_interleave(bs, -2)[..., :q, :].repeat_interleave(bs, -1)[..., :t]
    diag = sparse.diagonal(q, t, bs).repeat_interleave(bs, 0)[:q].repeat_interleave(bs, 1)[:, :t]
    return per | diag


# --- kernels ------------------------------------------------------------------------------------------------------
def test_flex_kernel_equals_the_eager_kernel_and_the_definition(monkeypatch):
    """One compiled shape (a 256-token bucket), plain and permuted keys; skipped where torch cannot compile."""
    monkeypatch.setattr(sparse, "FLEX_MIN_QUERIES", 64)
    monkeypatch.setattr(sparse, "PAD_TO", 256)
    bs, n = 32, 200
    call = _call(q=n, t=n, d=16)
    nb = sparse.n_blocks(n, bs)
    blocks = torch.rand(1, 4, nb, nb, generator=torch.Generator().manual_seed(1)) > 0.5
    out = sparse.block_sparse(call, blocks, bs)
    if call.shared["stats"]["prefill_kernel"] != "flex":
        pytest.skip(f"flex_attention cannot compile here: {sparse._flex_state.get('error')}")
    reference = _masked(call, _token_mask(blocks, bs, n, n))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse._gather(call, (blocks | sparse.diagonal(n, n, bs)) & sparse.causal_blocks(
        n, n, bs), bs, None), reference, rtol=1e-5, atol=1e-5)  # fmt: skip
    # permuted keys: blocks on the permuted axis, causality by slot
    order = segment_permutation(call, bs, 64)
    assert not torch.equal(order, torch.arange(n).expand_as(order))
    permuted_blocks = blocks | torch.ones(nb, nb, dtype=torch.bool).tril()  # own segments are the method's job
    flex_out = sparse.block_sparse(_call(q=n, t=n, d=16), permuted_blocks, bs, key_order=order)
    monkeypatch.setattr(sparse, "FLEX_MIN_QUERIES", 10**9)
    eager_out = sparse.block_sparse(_call(q=n, t=n, d=16), permuted_blocks, bs, key_order=order)
    torch.testing.assert_close(flex_out, eager_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q,t", [(40, 40), (24, 56)])
def test_permuted_blocks_attend_to_the_keys_they_hold(q, t):
    call = _call(q=q, t=t)
    bs = 8
    order = torch.stack([torch.randperm(t, generator=torch.Generator().manual_seed(s)) for s in range(2)])[None]
    nq, nk = sparse.n_blocks(q, bs), sparse.n_blocks(t, bs)
    blocks = torch.rand(1, 4, nq, nk, generator=torch.Generator().manual_seed(2)) > 0.4
    out = sparse.block_sparse(call, blocks, bs, key_order=order)
    # slot s is attended by query block i iff its permuted position's block is selected, or that block holds one of
    # query block i's own slots (the permuted diagonal: every row sees at least itself)
    position = order.argsort(-1).repeat_interleave(2, 1)  # (1, Hq, T): permuted position of each slot
    chosen = blocks.clone()
    for r in range(q):
        chosen[:, :, r // bs].scatter_(-1, position[:, :, t - q + r, None] // bs, True)
    per_slot = chosen.gather(-1, (position // bs)[:, :, None, :].expand(-1, -1, nq, -1))
    mask = per_slot.repeat_interleave(bs, -2)[..., :q, :]
    torch.testing.assert_close(out, _masked(call, mask), rtol=1e-5, atol=1e-6)


def test_token_sparse_attends_to_the_listed_slots_and_the_diagonal():
    call = _call(q=32, t=48)
    bs = 8
    nq = 4
    gen = torch.Generator().manual_seed(5)
    slots = torch.stack([torch.randperm(48, generator=gen)[:10] for _ in range(4 * nq)]).view(1, 4, nq, 10)
    listed = torch.rand(1, 4, nq, 10, generator=gen) > 0.3
    out = sparse.token_sparse(call, slots, listed, bs)
    mask = torch.zeros(1, 4, nq, 48, dtype=torch.bool).scatter_(-1, slots, listed)
    mask = mask.repeat_interleave(bs, -2) | _token_mask(torch.zeros(1, 4, nq, 6, dtype=torch.bool), bs, 32, 48)
    torch.testing.assert_close(out, _masked(call, mask), rtol=1e-5, atol=1e-6)
    assert 0 < call.shared["stats"]["prefill_density"] < 1


def test_cumulative_select_takes_the_fewest_entries_reaching_the_threshold():
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    ok = torch.ones(1, dtype=torch.bool)
    assert sparse.cumulative_select(scores, 0.5, ok).tolist() == [[False, True, False, False, False]]
    assert sparse.cumulative_select(scores, 0.8, ok).tolist() == [[False, True, False, True, False]]
    assert sparse.cumulative_select(scores, 0.85, ok).tolist() == [[True, True, False, True, False]]
    assert sparse.cumulative_select(scores, 1.0, ok).all()
    only = torch.tensor([True, False, True, True, True])
    assert sparse.cumulative_select(scores, 0.7, only).tolist() == [[True, False, False, True, False]]


def test_causal_pairs_count_the_visible_pairs_of_every_block():
    for q, t, bs in ((40, 40, 8), (30, 50, 8), (37, 37, 16)):
        mask = causal_allowed(q, t, None)[0, 0].float()
        expected = sparse.pool_blocks(sparse.pool_blocks(mask, bs, 0, "sum"), bs, 1, "sum")
        torch.testing.assert_close(sparse.causal_pairs(q, t, bs), expected)


# --- the methods' selections against their definitions --------------------------------------------------------------
def test_xattention_scores_are_strided_antidiagonal_sums():
    call = _call(q=32, t=32, h=1, g=1, d=4)
    bs, stride = 8, 4
    got = antidiagonal_scores(call, bs, stride)
    q, k = call.query[0, 0], call.keys[0, 0]
    n = 32 // stride
    logits = torch.empty(n, n)
    for r in range(n):
        for c in range(n):
            logits[r, c] = sum(float(q[r * stride + stride - 1 - j] @ k[c * stride + j]) for j in range(stride))
    logits = logits * call.scaling / stride
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    per = bs // stride
    expected = logits.view(4, per, 4, per).sum((1, 3))
    torch.testing.assert_close(got[0, 0], expected, rtol=1e-5, atol=1e-6)


def test_flexprefill_js_distance_and_vertical_slash_lines():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    m = (p + q) / 2
    kl = lambda a: sum(float(x) * math.log(float(x) / float(y)) for x, y in zip(a, m, strict=True) if x > 0)  # noqa: E731
    assert math.isclose(float(js_distance(p, q)), math.sqrt(0.5 * kl(p) + 0.5 * kl(q)), rel_tol=1e-5)
    probs = torch.rand(1, 1, 4, 12)
    slash = sparse.slash_sums(probs, 12)
    expected = torch.zeros(12)
    for r in range(4):
        for k in range(12):
            if (8 + r) - k >= 0:
                expected[(8 + r) - k] += probs[0, 0, r, k]
    torch.testing.assert_close(slash[0, 0], expected)
    vertical = torch.zeros(1, 1, 16, dtype=torch.bool)
    vertical[..., 5] = True
    diag = torch.zeros(1, 1, 16, dtype=torch.bool)
    diag[..., 6] = True  # query slot - 6
    blocks = sparse.vertical_slash_blocks(vertical, diag, 16, 4)[0, 0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:, 1] = True  # key 5 in every query block
    for s in range(6, 16):  # the diagonal: query s sees key s - 6
        expected[s // 4, (s - 6) // 4] = True
    assert torch.equal(blocks, expected)


def test_hip_tree_search_finds_the_planted_blocks():
    bs, nq, k = 4, 8, 2
    query = torch.zeros(1, 1, nq * bs, 4)
    query[..., 0] = 1.0
    keys = torch.zeros(1, 1, nq * bs, 4)
    keys[0, 0, 3 * bs, 0] = 5.0  # first token of block 3
    keys[0, 0, 5 * bs, 0] = 3.0  # first token of block 5
    visible = torch.arange(nq)  # query block i chooses among the i blocks before its diagonal
    found = hierarchical_top_k(query, keys, 1.0, visible, k, bs)[0, 0]
    assert set(found[7].tolist()) == {3, 5}
    assert 3 in found[4].tolist()
    assert found[0].tolist() == [-1, -1] and sorted(found[1].tolist()) == [-1, 0]  # fewer blocks than top_k


def test_power_attention_pattern_is_window_sinks_and_powers_of_two():
    pattern = power_pattern(20, 20, 0, window=2, sink=1)
    row = pattern[19].nonzero().flatten().tolist()
    assert row == [0, 3, 11, 15, 17, 18, 19]  # sink, 19-16, 19-8, 19-4, 19-2, 19-1 (window), 19 (own)


def test_pbs_permutes_within_segments_only():
    call = _call(q=40, t=40)
    order = segment_permutation(call, 8, 16)
    for s in (0, 16):
        assert sorted(order[0, 0, s : s + 16].tolist()) == list(range(s, s + 16))
    assert order[0, 0, 32:].tolist() == list(range(32, 40))  # the incomplete last segment stays in place


def test_anchor_keeps_keys_within_theta_of_the_anchor():
    method = build("anchor_attention(block_size=8, theta=0.5)")
    call = _call(q=32, t=32, h=1, g=1)
    slots, listed = method.stripes(call)
    q, k = call.query[0, 0], call.keys[0, 0]
    i = 3  # query block 3: rows 24..31, diagonal block 3, sink block 0
    rows = q[24:32]
    cols = torch.cat([torch.arange(8), torch.arange(24, 32)])
    logits = (rows @ k[cols].T) * call.scaling
    visible = cols[None, :] <= torch.arange(24, 32)[:, None]
    anchor = logits.masked_fill(~visible, float("-inf")).amax(-1).mean()
    score = (rows.mean(0) @ k.T) * call.scaling
    expected = {j for j in range(8, 24) if float(score[j]) >= float(anchor) - 0.5} | set(range(8))
    assert set(slots[0, 0, i][listed[0, 0, i]].tolist()) == expected


# --- through the model ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPARSE_SPECS)
def test_sparse_settings_change_the_output_record_density_and_repeat(llama, spec):
    ids = prompt_ids(72)
    with torch.no_grad():
        with Sieve("full").attach(llama) as cache:
            ref = llama(ids, past_key_values=cache).logits
        outs = []
        for _ in range(2):
            with Sieve("full", prefill=spec).attach(llama) as cache:
                outs.append(llama(ids, past_key_values=cache).logits)
            stats = cache.stats()
    assert torch.equal(outs[0], outs[1])  # same input, same output
    assert 0 < stats["prefill_density"] < 1
    assert len(stats["prefill_density_layers"]) == 2 and len(stats["prefill_density_heads"][0]) == 4
    assert not torch.equal(outs[0], ref)


def test_flexprefill_reports_its_pattern_choice(llama):
    with torch.no_grad(), Sieve("full", prefill="flexprefill(block_size=8, gamma=0.8)").attach(llama) as cache:
        llama(prompt_ids(64), past_key_values=cache)
    assert 0.0 <= cache.stats()["prefill_query_aware"] <= 1.0


def test_sparse_prefill_runs_only_on_full_attention_layers():
    gemma = make_model("gemma3")  # layers 0 and 2 slide (transformers' own window), 1 and 3 are full
    with torch.no_grad(), Sieve("full", prefill="xattention(block_size=8, stride=4, threshold=0.5)").attach(
        gemma) as cache:  # fmt: skip
        gemma(prompt_ids(48), past_key_values=cache)
    layers = cache.stats()["prefill_density_layers"]
    assert layers[0] is None and layers[2] is None
    assert layers[1] is not None and layers[3] is not None


def test_sparse_prefill_composes_with_eviction(llama):
    ids = prompt_ids(80)
    with torch.no_grad(), Sieve("snapkv", compression=0.5, prefill="flexprefill(block_size=8)").attach(llama) as cache:
        logits = llama(ids, past_key_values=cache).logits
        llama(logits[:, -1:].argmax(-1), past_key_values=cache)
    assert cache.kv_tokens() == [41, 41]


def test_padded_batches_match_each_row_alone(llama):
    ids = prompt_ids(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    spec = "xattention(block_size=8, stride=4, threshold=1.0)"
    with torch.no_grad(), Sieve("full", prefill=spec).attach(llama) as cache:
        batched = llama(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
    with torch.no_grad(), Sieve("full").attach(llama) as cache:
        alone = llama(ids[1:, 6:], past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(batched[1], alone[0], rtol=1e-4, atol=1e-4)


# --- minference profiles ------------------------------------------------------------------------------------------
def test_minference_search_writes_a_profile_that_runs_and_is_refused_by_another_model(tmp_path, llama):
    path = tmp_path / "profile.json"
    profile = minference.search(llama, prompt_ids(64), path, density=0.5, block_size=8, last_q=8)
    saved = json.loads(path.read_text())
    assert saved == profile and saved["layers"] == 2 and saved["heads"] == 4
    for head in saved["patterns"][0]:
        assert head["pattern"] in minference.PATTERNS and 0 <= head["recall"] <= 1 and head["density"] <= 0.5 + 1e-9
    with torch.no_grad(), Sieve("full", prefill=f"minference(profile={str(path)!r}, block_size=8)").attach(
        llama) as cache:  # fmt: skip
        llama(prompt_ids(64), past_key_values=cache)
    assert 0 < cache.stats()["prefill_density"] < 1
    gemma = make_model("gemma3")
    with (
        pytest.raises(KVSieveError, match=r"was made for .* make one for it with kvsieve\.methods\.minference\.search"),
        torch.no_grad(),
        Sieve("full", prefill=f"minference(profile={str(path)!r}, block_size=8)").attach(gemma) as cache,
    ):
        gemma(prompt_ids(32), past_key_values=cache)


def test_minference_refuses_a_missing_or_foreign_profile(tmp_path):
    with pytest.raises(KVSieveError, match="does not exist; make one with"):
        build("minference(profile='/nonexistent/profile.json')")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"heads": []}))
    with pytest.raises(KVSieveError, match="is not a kvsieve minference profile"):
        build(f"minference(profile={str(other)!r})")


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,message",
    [
        ("flexprefill(gamma=1.5)", r"gamma must be <= 1\.0"),
        ("flexprefill(gamma=0.0)", r"gamma must be > 0\.0"),
        ("flexprefill(tau=-0.1)", r"tau must be >= 0\.0"),
        ("xattention(threshold=2.0)", r"threshold must be <= 1\.0"),
        ("xattention(block_size=100, stride=8)", "must be a multiple of stride"),
        ("minference(vertical=0.0)", r"vertical must be > 0\.0"),
        ("anchor_attention(theta=-1.0)", r"theta must be >= 0\.0"),
        ("pbs_attention(threshold=0.0)", r"threshold must be > 0\.0"),
        ("pbs_attention(block_size=64, segment_size=100)", "must be a multiple of block_size"),
        ("power_attention(window=0)", "window must be >= 1"),
        ("hip(top_k=0)", "top_k must be >= 1"),
        ("oracle_topk(density=0.0)", r"density must be > 0\.0"),
    ],
)
def test_out_of_range_settings_are_refused_with_the_field_named(spec, message):
    with pytest.raises(KVSieveError, match=message):
        build(spec)


# --- the benchmark's prefill view -----------------------------------------------------------------------------------
def test_prefill_table_reports_speedup_density_and_the_nearest_oracle():
    def row(prefill, score, seconds, density, sample):
        stats = {"prefill_density": density} if density is not None else {}
        return {"task": "passkey", "length": 8192, "method": "full", "compression": 0.0, "prefill": prefill,
                "score": score, "prefill_seconds": seconds, "stats": stats, "sample": sample, "mode": "agnostic",
                "shared_prefill": False}  # fmt: skip

    rows = [row(None, 1.0, 10.0, None, s) for s in range(4)]
    rows += [row("flexprefill", float(s != 0), 5.0, 0.3, s) for s in range(4)]
    rows += [row("oracle_topk(density=0.3)", 1.0, 12.0, 0.32, s) for s in range(4)]
    rows += [row("oracle_topk(density=0.6)", 1.0, 12.0, 0.61, s) for s in range(4)]
    table = {r.prefill: r for r in prefill_table(rows)}
    assert next(iter(table)) == "dense"
    flex = table["flexprefill"]
    assert flex.speedup == pytest.approx(2.0) and flex.density == pytest.approx(0.3)
    assert flex.delta_vs_dense == pytest.approx(-0.25)
    assert flex.oracle_spec == "oracle_topk(density=0.3)" and flex.oracle.mean == 1.0
    assert prefill_table([r for r in rows if r["prefill"] is None]) == []
