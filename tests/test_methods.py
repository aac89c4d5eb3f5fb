"""Method scores and attention statistics on hand-built tensors, against naive references."""

from __future__ import annotations

import pytest
import torch

from kvsieve.attention import AttentionRequest, causal_allowed, column_sums
from kvsieve.methods import build
from kvsieve.methods.base import LayerContext, Observation


def naive_probs(query, keys, scaling, valid=None):
    """Eager softmax attention (B, Hq, q, T) with the new queries last, GQA by repetition."""
    _, hq, q, _ = query.shape
    h, t = keys.shape[1], keys.shape[2]
    k = keys.repeat_interleave(hq // h, dim=1)
    logits = (query @ k.transpose(-1, -2)) * scaling
    allowed = causal_allowed(q, t, valid)
    if allowed.shape[1] > 1:
        allowed = allowed.repeat_interleave(hq // h, dim=1)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


@pytest.mark.parametrize("last", [None, 1, 5])
@pytest.mark.parametrize("with_padding", [False, True])
def test_column_sums_match_eager_attention_in_chunks(last, with_padding):
    torch.manual_seed(0)
    b, h, g, q, t, d = 2, 2, 3, 11, 17, 8
    query, keys = torch.randn(b, h * g, q, d), torch.randn(b, h, t, d)
    valid = None
    if with_padding:
        valid = torch.ones(b, h, t, dtype=torch.bool)
        valid[1, :, :4] = False
    got = column_sums(query, keys, 0.3, valid, AttentionRequest(last=last), chunk=4)
    probs = naive_probs(query, keys, 0.3, valid)
    first = 0 if last is None else q - last
    torch.testing.assert_close(got, probs[:, :, first:].sum(2), rtol=1e-5, atol=1e-6)


def test_decayed_column_sums_equal_sequential_a2sf_updates():
    torch.manual_seed(1)
    b, h, q, t, d, gamma = 1, 2, 6, 10, 4, 0.8
    query, keys = torch.randn(b, h, q, d), torch.randn(b, h, t, d)
    got = column_sums(query, keys, 0.5, None, AttentionRequest(decay=gamma), chunk=4)
    probs = naive_probs(query, keys, 0.5)
    acc = torch.zeros(b, h, t)
    for i in range(q):  # one query at a time: s <- gamma * s + a_i
        acc = gamma * acc + probs[:, :, i]
    torch.testing.assert_close(got, acc, rtol=1e-5, atol=1e-6)


def observation(t=12, h=2, g=2, q=4, budget=6, attention=None, seed=0):
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


def test_knorm_prefers_small_keys():
    obs = observation()
    obs.keys[0, 0, 5] *= 0.01
    scores = build("knorm").score(obs)
    assert scores[0, 0].argmax() == 5
    torch.testing.assert_close(scores, -obs.keys.norm(dim=-1))


def test_streaming_llm_keeps_sinks_then_most_recent():
    obs = observation(t=12, budget=6)
    scores = build("streaming_llm(n_sink=2)").score(obs)
    kept = scores.topk(6, dim=-1).indices.sort(-1).values
    assert kept[0, 0].tolist() == [0, 1, 8, 9, 10, 11]


def test_snapkv_pools_window_votes_and_keeps_the_window():
    attn = torch.zeros(1, 4, 12)
    attn[:, :, 3] = 1.0  # every query head votes for token 3
    obs = observation(attention=attn)
    method = build("snapkv(window=2, kernel=3)")
    scores = method.score(obs)
    assert torch.isinf(scores[..., -2:]).all()  # the observation window is kept
    finite = scores[..., :-2]
    assert finite[0, 0].argmax() in (2, 3, 4) and finite[0, 0, 2] > 0 and finite[0, 0, 4] > 0  # neighbours pooled
    assert finite[0, 0, 0] == 0


def test_tova_gives_every_head_of_a_layer_the_same_scores():
    attn = torch.rand(1, 4, 12)
    scores = build("tova").score(observation(attention=attn))
    assert torch.equal(scores[:, 0], scores[:, 1])
    torch.testing.assert_close(scores[:, 0], attn.mean(1))


def test_h2o_accumulates_and_a2sf_forgets():
    h2o, a2sf = build("h2o(recent=0.0)"), build("a2sf(forgetting=0.5, recent=0.0)")
    first = torch.zeros(1, 4, 12)
    first[..., 2] = 1.0
    second = torch.zeros(1, 4, 12)
    second[..., 7] = 1.0
    for method in (h2o, a2sf):
        obs = observation(attention=first, q=1)
        method.observe(obs)
        obs2 = observation(attention=second, q=1)
        obs2.state = obs.state
        method.observe(obs2)
        s = method.score(obs2)
        if method is h2o:
            assert s[0, 0, 2] == s[0, 0, 7] == 1.0
        else:
            assert s[0, 0, 2] == 0.5 and s[0, 0, 7] == 1.0


def test_h2o_reserves_the_recent_share_of_the_budget():
    obs = observation(t=12, budget=8, attention=torch.zeros(1, 4, 12), q=1)
    method = build("h2o")  # recent = 0.5: 4 of 8 slots go to the 4 newest tokens
    method.observe(obs)
    s = method.score(obs)
    assert torch.isinf(s[..., 8:]).all() and not torch.isinf(s[..., :8]).any()


def test_random_is_seeded():
    a = build("random(seed=1)").score(observation())
    assert torch.equal(a, build("random(seed=1)").score(observation()))
    assert not torch.equal(a, build("random(seed=2)").score(observation()))


def test_adakv_splits_the_layer_budget_across_heads_by_score():
    method = build("adakv(alpha_safeguard=0.25):knorm")
    concentrated = torch.full((1, 1, 12), -1.0)
    concentrated[..., :2] = 5.0
    diffuse = torch.linspace(0, 4, 12).view(1, 1, 12)
    picks = method.select([torch.cat([concentrated, diffuse], dim=1)], 4, LayerContext(0, 1, 12, 12))
    lengths = [p.shape[-1] for p in picks]
    assert sum(lengths) == 8
    assert lengths[1] > lengths[0] >= 1  # the safeguard gives the concentrated head at least 1 token


def test_top_set_picks_the_slots_top_slots_picks():
    """The O(T) selection (kthvalue) keeps the same slots as the stable sort, ties to the lower slot included."""
    from kvsieve.methods.base import top_set, top_slots

    torch.manual_seed(0)
    for trial in range(200):
        t = int(torch.randint(2, 60, ()))
        scores = torch.randint(0, 5, (2, 3, t)).float() if trial % 2 else torch.randn(2, 3, t)
        scores[..., : trial % 4] = float("inf")
        for k in {1, t // 2, t - 1, t}:
            want = top_slots(scores, k).sort(dim=-1).values
            assert torch.equal(top_set(scores, k), want), (trial, k)


def test_adakv_allocates_all_heads_at_once_as_it_does_head_by_head():
    """The padded, all-heads-at-once allocation (the fast path) keeps the same tokens per head as the loop over
    heads, for heads of different lengths, tied scores and tokens forced in with +inf."""
    from kvsieve.methods.adakv import _select_each, _select_padded

    torch.manual_seed(0)
    for trial in range(300):
        lengths = torch.randint(20, 80, (int(torch.randint(1, 5, ())),)).tolist()
        budget = int(torch.randint(5, min(lengths), ()))
        per_head = [torch.randn(1, n) if trial % 3 else torch.randint(0, 4, (1, n)).float() for n in lengths]
        if trial % 5 == 0:
            for s in per_head:
                s[0, -3:] = float("inf")
        guaranteed = max(1, int(0.2 * budget))
        fast, each = _select_padded(per_head, guaranteed, budget), _select_each(per_head, guaranteed, budget)
        assert [sorted(f.flatten().tolist()) for f in fast] == [sorted(e.flatten().tolist()) for e in each], trial


@pytest.mark.parametrize(
    "spec", ["adakv:snapkv", "adakv(alpha_safeguard=0.1):snapkv(window=16)", "h2o", "streaming_llm(n_sink=0)"]
)
def test_spec_round_trips(spec):
    method = build(spec)
    assert method.spec() == spec
    assert build(method.spec()).params() == method.params()
