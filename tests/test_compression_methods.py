"""Eviction, merging and quantisation methods of issue 5 on hand-built tensors and tiny random models.

Each method's specific claim is checked on tensors built by hand (MiniCache merging identical layers is lossless,
quantisation error within half a step, Keyformer without noise is its deterministic score's top-k, KVCrush groups
identical signatures, per-head budgets sum to the layer's), and every method runs end to end under ``Sieve`` with the
bytes held, measured from the cache's tensors, equal to what the method promises.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, build
from kvsieve.attention import AttentionRequest, column_sums
from kvsieve.methods.base import LayerContext, Observation
from kvsieve.methods.compresskv import CompressKV, calibrate, error_aware_budgets
from kvsieve.methods.ems import EMS, evict_then_merge
from kvsieve.methods.keyformer import gumbel_scores
from kvsieve.methods.kivi import kivi_nbytes
from kvsieve.methods.kvcrush import group_tokens, representatives
from kvsieve.methods.pyramidkv import pyramid_budgets
from kvsieve.methods.zipcache import probe_attention, zipcache_nbytes
from kvsieve.storage import Segment
from kvsieve.storage.merged import MergedSegment, merge_pair, slerp
from kvsieve.storage.quantized import (
    FP,
    HIGH,
    LOW,
    KiviSegment,
    MixedSegment,
    dequantize,
    pack_bits,
    quantize,
    unpack_bits,
)
from tiny_models import make_model, prompt_ids

HEAD_DIM, HEADS, LAYERS = 16, 2, 2  # the tiny Llama's KV layout (fp32)


def segment(b=1, h=2, t=20, d=16, seed=0) -> Segment:
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, d, generator=gen)
    keys[..., 3] *= 8.0  # an outlier channel, as real keys have
    return Segment(0, keys, values, torch.arange(t).expand(b, h, t).clone())


def observation(t=12, h=2, g=2, q=4, budget=6, attention=None, seed=0) -> Observation:
    torch.manual_seed(seed)
    return Observation(
        layer_idx=0,
        n_layers=1,
        keys=torch.randn(1, h, t, 8),
        values=torch.randn(1, h, t, 8),
        queries=torch.randn(1, h * g, q, 8),
        positions=torch.arange(t).expand(1, h, t).clone(),
        valid=None,
        attention=attention,
        state={},
        n_new=q,
        scaling=0.35,
        budget=budget,
    )


def run(model, cache, ids, steps=4, chunk=None) -> torch.Tensor:
    """Prefill (optionally in chunks) then greedy-decode ``steps`` tokens; returns the last logits."""
    step = ids.shape[1] if chunk is None else chunk
    with torch.no_grad():
        for start in range(0, ids.shape[1], step):
            logits = model(ids[:, start : start + step], past_key_values=cache).logits
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
    return logits


# --- quantisation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_packing_round_trips_and_uses_bits_per_code(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 16), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 16 * bits // 8
    assert torch.equal(unpack_bits(packed, bits, 16), codes)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [-1, -2])
def test_quantise_dequantise_error_is_within_half_a_step(bits, dim):
    x = torch.randn(2, 3, 32, 16) * torch.linspace(0.1, 20.0, 16)
    packed, scale, zero = quantize(x, bits, dim=dim)
    rebuilt = dequantize(packed, scale, zero, bits, 16)
    step = scale.float()
    assert bool(((rebuilt - x).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all())
    span = x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)
    assert bool((step <= span / ((1 << bits) - 1) * (1 + 2e-3) + 1e-7).all())  # the step is the bit width's


def test_kivi_segment_holds_promised_bytes_and_bounded_error():
    seg = segment(t=45)
    keys, values = seg.keys.clone(), seg.values.clone()
    kivi = KiviSegment(seg, bits=2, group=8, residual=8)
    kivi.compress()
    assert kivi.n_quantized == 32 and kivi.rk.shape[2] == 13  # residual between 8 and 8 + 7
    assert kivi.nbytes() == kivi_nbytes(45, HEADS, HEAD_DIM, 2, 8, 8, 4)
    rk, rv = kivi.read()
    assert torch.equal(rk[:, :, 32:], keys[:, :, 32:]) and torch.equal(rv[:, :, 32:], values[:, :, 32:])
    key_step = kivi.ks.float().repeat_interleave(8, dim=2)  # per channel, per group of 8 tokens
    assert bool(((rk[:, :, :32] - keys[:, :, :32]).abs() <= key_step / 2 + 1e-5).all())
    assert bool(((rv[:, :, :32] - values[:, :, :32]).abs() <= kivi.vs.float() / 2 + 1e-5).all())
    assert kivi.nbytes() < 0.45 * seg.nbytes()  # 13 of 45 tokens are still in full precision


def test_kivi_segment_gather_append_and_split_keep_what_it_reads():
    kivi = KiviSegment(segment(t=40), bits=4, group=8, residual=8)
    kivi.compress()
    before_k, before_v = kivi.read()
    index = torch.stack([torch.tensor([0, 5, 9, 17, 30, 33, 36, 39]), torch.tensor([1, 2, 3, 4, 6, 7, 8, 35])])[None]
    kivi.gather(index)  # head 0 keeps 5 quantised tokens, head 1 keeps 7: the surplus goes back to the residual
    after_k, after_v = kivi.read()
    idx = index[..., None].expand(-1, -1, -1, HEAD_DIM)
    assert torch.equal(after_k, before_k.gather(2, idx)) and torch.equal(after_v, before_v.gather(2, idx))
    assert torch.equal(kivi.positions, index)
    assert kivi.n_quantized == 5
    new_k, new_v = torch.randn(1, 2, 3, HEAD_DIM), torch.randn(1, 2, 3, HEAD_DIM)
    kivi.append(new_k, new_v, torch.full((1, 2, 3), 50), None)
    k, _ = kivi.read()
    assert torch.equal(k[:, :, -3:], new_k) and kivi.length == 11
    heads = kivi.split_heads()
    assert [h.head_start for h in heads] == [0, 1]
    assert torch.equal(torch.cat([h.read()[0] for h in heads], dim=1), kivi.read()[0])
    assert sum(h.nbytes() for h in heads) <= kivi.nbytes()


def test_mixed_segment_stores_salient_tokens_at_high_bits_with_promised_bytes():
    seg = segment(t=20)
    keys = seg.keys.clone()
    mixed = MixedSegment(seg, high_bits=4, low_bits=2)
    pending = torch.ones(1, 2, 20, dtype=torch.bool)
    pending[..., -4:] = False  # the four newest stay in full precision
    salient = torch.zeros(1, 2, 20, dtype=torch.bool)
    salient[:, 0, :8], salient[:, 1, 10:16] = True, True  # heads differ in how many salient tokens they hold
    mixed.quantize_tokens(pending, salient)
    assert mixed.counts() == {FP: 8, LOW: 18, HIGH: 14}
    assert mixed.nbytes() == zipcache_nbytes(8, 14, 18, HEAD_DIM, 4, 2, 4, normalised_heads=2)
    rk, _ = mixed.read()
    assert torch.equal(rk[..., -4:, :], keys[..., -4:, :])
    norm = mixed.ck.float()
    for cls, mask in ((HIGH, pending & salient), (LOW, pending & ~salient)):
        scale = mixed.qk[cls][1].float()  # (N, 1): one step per (token, head)
        err = (rk[mask] - keys[mask]).abs()
        assert bool((err <= scale / 2 * norm.expand(1, 2, 20, HEAD_DIM)[mask] * (1 + 1e-3) + 1e-5).all())
    high_err = (rk[pending & salient] - keys[pending & salient]).abs().mean()
    low_err = (rk[pending & ~salient] - keys[pending & ~salient]).abs().mean()
    assert high_err < low_err / 2


def test_mixed_segment_gather_append_split_and_assignment():
    mixed = MixedSegment(segment(t=20), high_bits=4, low_bits=2)
    salient = torch.rand(1, 2, 20, generator=torch.Generator().manual_seed(1)) > 0.5
    mixed.quantize_tokens(torch.ones(1, 2, 20, dtype=torch.bool), salient)
    new_k, new_v = torch.randn(1, 2, 2, HEAD_DIM), torch.randn(1, 2, 2, HEAD_DIM)
    mixed.append(new_k, new_v, torch.full((1, 2, 2), 30), None)
    before_k, before_v = mixed.read()
    index = torch.stack([torch.tensor([0, 3, 7, 20, 21]), torch.tensor([2, 4, 5, 6, 21])])[None]
    mixed.gather(index)
    idx = index[..., None].expand(-1, -1, -1, HEAD_DIM)
    after_k, after_v = mixed.read()
    assert torch.equal(after_k, before_k.gather(2, idx)) and torch.equal(after_v, before_v.gather(2, idx))
    heads = mixed.split_heads()
    assert torch.equal(torch.cat([h.read()[0] for h in heads], dim=1), mixed.read()[0])
    slots = torch.tensor([[[0, 2], [1, 4]]])
    new_k, new_v = torch.randn(1, 2, 2, HEAD_DIM), torch.randn(1, 2, 2, HEAD_DIM)
    before_k, before_v = mixed.read()
    mixed.write(slots, new_k, new_v)  # what the core does after a merge: those rows become dense
    want_k = before_k.clone().scatter_(2, slots[..., None].expand(-1, -1, -1, HEAD_DIM), new_k)
    want_v = before_v.clone().scatter_(2, slots[..., None].expand(-1, -1, -1, HEAD_DIM), new_v)
    assert torch.equal(mixed.keys, want_k) and torch.equal(mixed.values, want_v)
    assert mixed.counts()[FP] == 10


def test_zipcache_saliency_is_attention_normalised_by_queries_that_see_each_token():
    obs = observation(t=10, q=10, seed=3)  # a prompt: token j is seen by the 10 - j queries after it
    sums, counts = probe_attention(obs, fraction=1.0, seed=0)
    expected = column_sums(obs.queries, obs.keys, obs.scaling, None, AttentionRequest()).view(1, 2, 2, 10).mean(2)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [10.0 - j for j in range(10)]
    raw_first = sums[..., 0] / 1.0
    assert bool((sums[..., 0] / counts[0] < raw_first).all())  # the bias of early tokens removed


def test_zipcache_probes_are_seeded():
    obs = observation(t=40, q=40, seed=4)
    a, _ = probe_attention(obs, fraction=0.2, seed=1)
    assert torch.equal(a, probe_attention(obs, fraction=0.2, seed=1)[0])
    assert not torch.equal(a, probe_attention(obs, fraction=0.2, seed=2)[0])


# --- bytes held on a model ----------------------------------------------------------------------------------------
def test_zipcache_alone_and_after_snapkv_hold_the_promised_bytes(llama):
    ids = prompt_ids(40)
    with Sieve("zipcache(block=16)").attach(llama) as cache, torch.no_grad():
        llama(ids, past_key_values=cache)
    quantised = 40 * HEADS  # every token of every head: 50% at 4 bits, 50% at 2 bits
    per_layer = zipcache_nbytes(0, quantised // 2, quantised // 2, HEAD_DIM, 4, 2, 4, normalised_heads=HEADS)
    assert cache.kv_bytes() == LAYERS * per_layer
    with Sieve("zipcache(block=16):snapkv", compression=0.5).attach(llama) as cache, torch.no_grad():
        llama(ids, past_key_values=cache)  # snapkv keeps 20 tokens per head, zipcache quantises them 4-bit on half
    per_layer = zipcache_nbytes(0, 20 * HEADS // 2, 20 * HEADS // 2, HEAD_DIM, 4, 2, 4, normalised_heads=HEADS)
    assert cache.kv_tokens() == [20, 20] and cache.kv_bytes() == LAYERS * per_layer
    full = 20 * LAYERS * HEADS * HEAD_DIM * 2 * 4
    assert cache.kv_bytes() < full / 4


def test_kivi_alone_and_after_snapkv_hold_the_promised_bytes(llama):
    ids = prompt_ids(40)
    with Sieve("kivi(group=8, residual=8)").attach(llama) as cache, torch.no_grad():
        llama(ids, past_key_values=cache)
    assert cache.kv_bytes() == LAYERS * kivi_nbytes(40, HEADS, HEAD_DIM, 2, 8, 8, 4)
    with Sieve("kivi(bits=4, group=4, residual=4):snapkv", compression=0.5).attach(llama) as cache, torch.no_grad():
        llama(ids, past_key_values=cache)
    assert cache.kv_tokens() == [20, 20]
    assert cache.kv_bytes() == LAYERS * kivi_nbytes(20, HEADS, HEAD_DIM, 4, 4, 4, 4)


def test_quantised_storage_is_real(llama):
    """The bytes counted are the bytes allocated: no tensor is a view into a larger buffer."""
    with Sieve("zipcache(block=8):snapkv", compression=0.5).attach(llama) as cache:
        run(llama, cache, prompt_ids(40), steps=3)
    for layer in cache.sieve_layers():
        seg = layer.segments[0]
        tensors = [seg.cls, seg.fk, seg.fv] + [t for c in (LOW, HIGH) for rows in (seg.qk[c], seg.qv[c]) for t in rows]
        for t in tensors:
            assert t.untyped_storage().nbytes() == t.nelement() * t.element_size()


# --- minicache ----------------------------------------------------------------------------------------------------
def test_slerp_interpolates_unit_directions():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([[0.5**0.5, 0.5**0.5]]), atol=1e-6)
    assert torch.allclose(slerp(a, a, 0.6), a)


def test_minicache_merging_two_identical_layers_is_lossless_and_shares_memory():
    base = segment(t=12)
    copy = Segment(0, base.keys.clone(), base.values.clone(), base.positions.clone())
    shallow, deep = MergedSegment(base), MergedSegment(copy)
    merge_pair(shallow, deep, t=0.6, gamma=0.05)
    for seg in (shallow, deep):
        k, v = seg.read()
        torch.testing.assert_close(k, base.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, base.values, rtol=1e-5, atol=1e-5)
    pair = shallow.pair
    assert deep.pair is pair and bool(pair.mask_k.all()) and bool(pair.mask_v.all())  # nothing retained
    rows = 1 * HEADS * 12
    mags = 2 * rows * 4  # each layer: key and value magnitudes (fp32)
    shared = 2 * rows * HEAD_DIM * 4 + 2 * rows  # directions stored once, plus the merged flags
    assert shallow.nbytes() == mags and deep.nbytes() == mags + shared
    assert shallow.nbytes() + deep.nbytes() < 0.6 * 2 * base.nbytes()


def test_minicache_retains_distinct_tokens_unmerged():
    base = segment(t=12, seed=1)
    other_k = base.keys.clone()
    other_k[:, :, 5] = -other_k[:, :, 5]  # token 5 points the other way in the deeper layer
    deep = MergedSegment(Segment(0, other_k, base.values.clone(), base.positions.clone()))
    shallow = MergedSegment(base)
    merge_pair(shallow, deep, t=0.6, gamma=0.05)
    assert not bool(shallow.pair.mask_k[:, :, 5].any())
    assert torch.equal(deep.read()[0][:, :, 5], other_k[:, :, 5])  # retained exactly, per layer
    assert torch.equal(shallow.read()[0][:, :, 5], base.keys[:, :, 5])


def test_minicache_on_a_model_shares_layer_pairs_and_counts_them_once(llama):
    with Sieve("minicache(start=0, gamma=1.0)").attach(llama) as cache:
        logits = run(llama, cache, prompt_ids(30), steps=3)
    assert torch.isfinite(logits).all()
    first, second = (layer.segments[0] for layer in cache.sieve_layers())
    assert first.pair is second.pair and second.owner and not first.owner
    merged = int(first.pair.mask_k.sum()) + int(first.pair.mask_v.sum())  # (token, head) rows, keys and values
    rows = HEADS * 33
    retained = 2 * rows - merged
    per_layer = merged * 4 + retained * HEAD_DIM * 4  # own magnitudes of merged rows, own vectors of retained ones
    shared = merged * HEAD_DIM * 4 + 2 * rows  # one direction per merged row, merged flags: counted once
    assert cache.kv_bytes() == 2 * per_layer + shared
    assert merged > 0 and cache.kv_bytes() < 0.75 * 33 * LAYERS * HEADS * HEAD_DIM * 2 * 4
    assert cache.kv_tokens() == [33, 33]


def test_minicache_merges_only_layers_holding_the_same_tokens(llama):
    with Sieve("minicache(start=0, gamma=1.0):streaming_llm(rerotate=False)", budget=12, interval=1).attach(
        llama
    ) as cache:
        run(llama, cache, prompt_ids(30), steps=2)
    first, second = (layer.segments[0] for layer in cache.sieve_layers())
    assert first.pair is not None and first.pair is second.pair
    with Sieve("minicache(start=0):knorm", budget=12, interval=1).attach(llama) as cache:
        run(llama, cache, prompt_ids(30), steps=2)
    assert all(layer.segments[0].pair is None for layer in cache.sieve_layers())  # knorm keeps different tokens


# --- keyformer ----------------------------------------------------------------------------------------------------
def test_keyformer_without_noise_is_the_softmax_of_the_logits():
    obs = observation(t=12, q=5, seed=2)
    got = gumbel_scores(obs, tau=1.0, noise=0.0, seed=0)
    expected = column_sums(obs.queries, obs.keys, obs.scaling, None, AttentionRequest()).view(1, 2, 2, 12).mean(2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    hot = gumbel_scores(obs, tau=2.0, noise=0.0, seed=0)
    assert hot.std() < got.std()  # a higher temperature flattens the score


def test_keyformer_noise_is_seeded():
    obs = observation(t=12, q=5, seed=2)
    a = gumbel_scores(obs, tau=1.0, noise=1.0, seed=7)
    assert torch.equal(a, gumbel_scores(obs, tau=1.0, noise=1.0, seed=7))
    assert not torch.equal(a, gumbel_scores(obs, tau=1.0, noise=1.0, seed=8))
    assert not torch.allclose(a, gumbel_scores(obs, tau=1.0, noise=0.0, seed=7))


def test_keyformer_with_zero_noise_keeps_its_deterministic_scores_top_k(llama):
    """With no noise and a constant temperature of 1, Keyformer's score is accumulated attention: it keeps exactly
    what H2O keeps with the same recent window."""
    ids = prompt_ids(40)
    kept = []
    for spec in ("keyformer(noise=0.0, tau_delta=0.0, recent=0.3)", "h2o(recent=0.3)"):
        with Sieve(spec, budget=16, interval=1).attach(llama) as cache:
            run(llama, cache, ids, steps=3)
        kept.append([layer.segments[0].positions for layer in cache.sieve_layers()])
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


def test_keyformer_temperature_grows_per_decoding_step():
    method = build("keyformer(tau_init=1.0, tau_delta=0.5)")
    obs = observation(q=4)
    assert method.temperature(obs) == 1.0
    obs.n_new = 1
    assert [method.temperature(obs) for _ in range(3)] == [1.0, 1.5, 2.0]


# --- ems ----------------------------------------------------------------------------------------------------------
def test_ems_global_local_score_is_the_max_of_mean_aligned_scores():
    obs = observation(t=6)
    glo, loc = torch.tensor([8.0, 4, 2, 1, 1, 0]), torch.tensor([0.0, 0, 1, 1, 2, 2])
    obs.state = {"ems_global": glo.expand(1, 2, 6), "ems_local": loc.expand(1, 2, 6)}
    got = EMS().global_local(obs)
    aligned = glo * (loc.mean() / glo.mean())  # global rescaled to the local mean: 8 * 1 / (16 / 6) = 3, ...
    assert torch.allclose(got[0, 0], torch.maximum(aligned, loc))
    assert got[0, 0].tolist() == pytest.approx([3.0, 1.5, 1.0, 1.0, 2.0, 2.0])


def test_ems_merges_redundant_tokens_and_sends_the_rest_to_the_zero_class():
    keys = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    values = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(1))
    # token 3 duplicates centre 0 in head 0 (redundant) but is unrelated to every centre in head 1
    keys[:, 0, 3], values[:, 0, 3] = keys[:, 0, 0] * 2.0, values[:, 0, 0] + 0.01
    keys[:, 1, 3], values[:, 1, 3] = -keys[:, 1, 0], -values[:, 1, 0]
    keep = torch.tensor([[[0, 1], [0, 1]]])
    tbm = torch.tensor([[[3], [3]]])
    w = torch.ones(1, 2, 2)
    real = torch.ones(1, 2, 1, dtype=torch.bool)
    new_k, new_v = evict_then_merge(keys, values, keep, w, tbm, torch.ones(1, 2, 1), real, 0.5)
    assert new_k.shape == (1, 2, 2, 8)  # same shapes for every head: the zero class absorbs what is not merged
    torch.testing.assert_close(new_v[0, 0, 0], (values[0, 0, 0] + values[0, 0, 3]) / 2)
    torch.testing.assert_close(new_k[0, 0, 0].norm(), keys[0, 0, 0].norm())  # the centre's norm is kept
    assert torch.equal(new_k[0, 1], keys[0, 1, :2]) and torch.equal(new_v[0, 1], values[0, 1, :2])  # zero class
    assert torch.equal(new_k[0, 0, 1], keys[0, 0, 1])  # an untouched centre stays bit for bit


def test_ems_changes_kept_values_on_a_model_and_keeps_the_budget(llama):
    with Sieve("ems(window=4, threshold=-1.0)", budget=12, interval=1).attach(llama) as merged, torch.no_grad():
        llama(prompt_ids(40), past_key_values=merged)
    with Sieve("ems(window=4, merge_ratio=0.0)", budget=12, interval=1).attach(llama) as evicted, torch.no_grad():
        llama(prompt_ids(40), past_key_values=evicted)
    for a, b in zip(merged.sieve_layers(), evicted.sieve_layers(), strict=True):
        assert a.tokens_per_head() == [12, 12]
        assert torch.equal(a.segments[0].positions, b.segments[0].positions)  # same tokens kept...
        assert not torch.equal(a.segments[0].values, b.segments[0].values)  # ...but merged into


def test_adakv_keeps_the_wrapped_methods_merging(llama):
    """adakv reallocates budgets across heads; the inner method's merge still runs, per head."""
    caches = {}
    for spec in ("adakv:ems(window=4, threshold=-1.0)", "adakv:ems(window=4, merge_ratio=0.0)"):
        with Sieve(spec, budget=12, interval=1).attach(llama) as caches[spec], torch.no_grad():
            llama(prompt_ids(40), past_key_values=caches[spec])
    merged, evicted = caches.values()
    for a, b in zip(merged.sieve_layers(), evicted.sieve_layers(), strict=True):
        assert sum(a.tokens_per_head()) == 24 and a.tokens_per_head() == b.tokens_per_head()
        assert any(not torch.equal(x.values, y.values) for x, y in zip(a.segments, b.segments, strict=True))


def test_adakv_refuses_a_selective_read_method_inside():
    with pytest.raises(KVSieveError, match="quest\\(read_budget=256\\):adakv:snapkv"):
        build("adakv:quest")


# --- kvcrush ------------------------------------------------------------------------------------------------------
def test_kvcrush_groups_identical_signatures_together():
    rows = [[1, 0, 1], [0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]]
    sig = torch.tensor(rows, dtype=torch.bool)
    candidates = torch.ones(9, dtype=torch.bool)
    groups = group_tokens(sig, candidates, n_groups=3, anchor=torch.tensor([False, True, False]))
    for code in ({0, 2, 6}, {1, 4, 7}, {3, 5, 8}):
        assert len({int(groups[i]) for i in code}) == 1  # one group per signature
    assert sorted(groups.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.7, 0.4, 0.0, 0.6])
    reps = representatives(groups, scores, 3)
    assert sorted(reps.tolist()) == [1, 2, 5]  # the best-scored token of each signature group


def test_kvcrush_spends_its_share_on_representatives_of_evicted_tokens():
    method = build("kvcrush(share=0.5):knorm")
    scores = torch.randn(1, 2, 30, generator=torch.Generator().manual_seed(0))
    (picks,) = method.select([scores], 8, LayerContext(0, 1, 30, 30))
    assert picks.shape == (1, 2, 8)
    for h in range(2):
        assert set(scores[0, h].topk(4).indices.tolist()) <= set(picks[0, h].tolist())
        assert len(set(picks[0, h].tolist())) == 8
    for spec in ("kvcrush:adakv:snapkv", "adakv:kvcrush:snapkv"):  # two policies: one would be silently ignored
        with pytest.raises(KVSieveError, match="both decide which tokens each head keeps"):
            build(spec)


# --- budgets ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [7, 64, 100])
def test_pyramid_budgets_decrease_with_depth_and_sum_to_the_model_budget(budget):
    budgets = pyramid_budgets(budget, 30, beta=20)
    assert sum(budgets) == 30 * budget
    assert all(a >= b for a, b in itertools.pairwise(budgets)) and budgets[0] > budgets[-1]


def test_pyramidkv_gives_each_layer_its_pyramid_budget():
    model = make_model("gemma3")  # 4 layers: budgets for layers 1 and 3 (the full-attention ones)
    with Sieve("pyramidkv(beta=4):snapkv(window=4)", budget=10, interval=1).attach(model) as cache:
        run(model, cache, prompt_ids(40), steps=2)
    budgets = pyramid_budgets(10, 4, beta=4)
    assert [cache.kv_tokens()[i] for i in (1, 3)] == [budgets[1], budgets[3]]


@pytest.mark.parametrize("inner", ["keyformer", "ems", "compresskv", "pyramidkv:snapkv(window=4)"])
def test_per_head_budgets_of_a_layer_sum_to_the_layers_budget(llama, inner):
    with Sieve(f"adakv:{inner}", budget=10, interval=1).attach(llama) as cache:
        run(llama, cache, prompt_ids(40), steps=3)
    method = build(f"adakv:{inner}")
    for idx, layer in enumerate(cache.sieve_layers()):
        ctx = LayerContext(idx, LAYERS, seen=43, n_new=1)  # the last pass: 40 prompt tokens + 3 decoded
        assert sum(layer.tokens_per_head()) == method.layer_budget(10, ctx) * HEADS


def test_error_aware_budgets_follow_the_errors_within_bounds():
    budgets = error_aware_budgets([0.1, 0.2, 0.3, 0.4], 100, 32, 300)
    assert sum(budgets) == 400 and budgets == sorted(budgets) and min(budgets) >= 32
    assert error_aware_budgets([1, 0, 0, 0], 100, 32, 150) == [150, 84, 83, 83]


def test_compresskv_scores_with_its_retrieval_heads_only():
    attn = torch.zeros(1, 4, 12)
    attn[:, 0, 3] = 1.0  # query head 0 votes for token 3, the others for token 7
    attn[:, 1:, 7] = 1.0
    obs = observation(attention=attn, q=2)
    only_head_0 = CompressKV(window=2, kernel=1, heads=((0,),)).score(obs)
    assert bool((only_head_0[..., :-2].argmax(-1) == 3).all())
    assert bool((CompressKV(window=2, kernel=1, heads=((1, 2),)).score(obs)[..., :-2].argmax(-1) == 7).all())
    online = CompressKV(window=2, kernel=1, n_heads=1, n_sink=0).score(obs)
    assert torch.equal(online[:, 0], online[:, 1])  # one score for every KV head of the layer


def test_compresskv_calibration_sets_heads_and_layer_budgets(llama):
    method = calibrate(llama, prompt_ids(80), compression=0.5, n_heads=2, steps=3)
    assert len(method.heads) == LAYERS and all(len(h) == 2 for h in method.heads)
    assert abs(sum(method.layer_weights) - 1.0) < 1e-9
    rebuilt = build(method.spec())  # calibrated parameters travel in the spec string
    assert rebuilt.heads == method.heads and rebuilt.layer_weights == method.layer_weights
    with Sieve(method.spec().replace("compresskv(", "compresskv(min_tokens=4, "), budget=24, interval=1).attach(
        llama
    ) as cache:
        run(llama, cache, prompt_ids(60), steps=2)
    expected = error_aware_budgets(method.layer_weights, 24, 4, 72)
    assert cache.kv_tokens() == expected and sum(expected) == 48


# --- every method, end to end -------------------------------------------------------------------------------------
SPECS = [
    ("keyformer", dict(compression=0.5)),
    ("ems", dict(compression=0.5)),
    ("kvcrush", dict(compression=0.5)),
    ("kvcrush:keyformer", dict(budget=12)),
    ("pyramidkv", dict(compression=0.5)),
    ("pyramidkv:h2o", dict(budget=12)),
    ("compresskv", dict(compression=0.5)),
    ("kivi(group=8, residual=8)", {}),
    ("kivi(group=4, residual=4):snapkv", dict(compression=0.5)),
    ("zipcache(block=8)", {}),
    ("zipcache(block=8):snapkv", dict(compression=0.5)),
    ("zipcache(block=8):adakv:snapkv", dict(budget=12)),
    ("kivi(group=4, residual=4):pyramidkv:keyformer", dict(budget=12)),
    ("minicache(start=0)", {}),
    ("minicache(start=0):streaming_llm(rerotate=False)", dict(budget=12)),
    ("pyramidkv:adakv:snapkv", dict(budget=12)),
]


@pytest.mark.parametrize("spec,budget", SPECS, ids=[s for s, _ in SPECS])
def test_every_method_runs_end_to_end(llama, spec, budget):
    """Chunked prefill then decoding: eviction and packing at every pass, on storage packed by earlier passes."""
    ids = prompt_ids(40)
    with Sieve(spec, **budget).attach(llama) as cache:
        logits = run(llama, cache, ids, steps=4, chunk=16)
    assert torch.isfinite(logits).all()
    full = 44 * LAYERS * HEADS * HEAD_DIM * 2 * 4
    assert 0 < cache.kv_bytes() < full
    if "compression" in budget and not spec.startswith("pyramidkv"):  # int(40 * 0.5) after the prompt, + 4 decoded
        assert all(t == 24 or (isinstance(t, list) and sum(t) == 48) for t in cache.kv_tokens())


@pytest.mark.parametrize("spec", ["keyformer", "ems", "kvcrush", "pyramidkv", "compresskv"])
def test_compression_zero_is_full_attention(llama, spec):
    ids = prompt_ids(30)
    ref = run(llama, DynamicCache(config=llama.config), ids, steps=3)
    with Sieve(spec, compression=0.0).attach(llama) as cache:
        assert torch.equal(run(llama, cache, ids, steps=3), ref)


@pytest.mark.parametrize("spec", ["keyformer", "zipcache(block=8):snapkv", "kvcrush(anchor='random')"])
def test_same_seed_same_cache(llama, spec):
    def once():
        with Sieve(spec, compression=0.5).attach(llama) as cache:
            logits = run(llama, cache, prompt_ids(40), steps=3)
        return logits, [layer.segments[0].read()[0] for layer in cache.sieve_layers()]

    (la, ka), (lb, kb) = once(), once()
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ka, kb, strict=True))


@pytest.mark.parametrize(
    "spec,match",
    [
        ("kivi(bits=3)", "kivi: bits must be one of 2, 4, 8"),
        ("zipcache(salient=1.5)", "zipcache: salient must be <= 1.0"),
        ("zipcache:kivi", "cannot wrap another storage"),
        ("kivi:minicache", "cannot wrap another storage"),
        ("minicache(t=2.0)", "minicache: t must be <= 1.0"),
        ("pyramidkv(beta=0.5)", "pyramidkv: beta must be >= 1"),
        ("keyformer(noise=-1.0)", "keyformer: noise must be >= 0"),
        ("kvcrush(anchor='zigzag')", "kvcrush: anchor must be one of"),
        ("compresskv(kernel=4)", "odd"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(spec, match):
    with pytest.raises(KVSieveError, match=match):
        build(spec)


def test_quantisers_alone_keep_every_token_and_refuse_a_budget(llama):
    with pytest.raises(KVSieveError, match="keeps every token"):
        Sieve("zipcache", compression=0.5)
    assert build("zipcache:snapkv").evicts and not build("zipcache").evicts
    assert build("kivi:snapkv").spec() == "kivi:snapkv"
