"""kvpress's wrappers and policies (issue 12, item 3) against small naive references, and periodic decode budgets.

Each reference is written from the paper's / kvpress's formula in plain loops on random tensors; the registry-wide
matrix (test_matrix.py) covers budgets, ratios, chunking, the shared prefill, determinism and padded batches.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvsieve import KVSieveError, Sieve, build
from kvsieve.compat import cache_kwargs
from kvsieve.methods.base import LayerContext, Observation
from kvsieve.methods.cam import cam_contributions
from kvsieve.methods.critical_adakv import critical_ada_select, projected_value_norms
from kvsieve.methods.finch import window_votes
from kvsieve.methods.lukv import _hull_segments, allocate, allocation_curve
from kvsieve.methods.merging import merge_values
from kvsieve.methods.think import kept_channels
from kvsieve.storage.channels import ChannelPrunedSegment
from kvsieve.storage.segment import Segment
from tiny_models import make_model, prompt_ids


def observation(t=24, h=2, g=2, d=8, q=4, budget=10, seed=0, attention=None) -> Observation:
    gen = torch.Generator().manual_seed(seed)
    return Observation(
        layer_idx=0, n_layers=2, keys=torch.randn(1, h, t, d, generator=gen),
        values=torch.randn(1, h, t, d, generator=gen), queries=torch.randn(1, h * g, q, d, generator=gen),
        positions=torch.arange(t).expand(1, h, t).clone(), valid=None, attention=attention, state={}, n_new=q,
        scaling=d**-0.5, budget=budget, seen=t,
    )  # fmt: skip


def kept_by(scores: torch.Tensor, k: int) -> list[set[int]]:
    """The slots each head of a ``(1, h, T)`` score tensor keeps under a top-k."""
    return [set(scores[0, h].topk(k).indices.tolist()) for h in range(scores.shape[1])]


# --- merging ----------------------------------------------------------------------------------------------------------
def test_merging_folds_each_evicted_value_into_its_most_similar_kept_token():
    torch.manual_seed(0)
    b, h, t, d, k = 1, 2, 12, 6, 5
    keys, values = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    keep = torch.stack([torch.randperm(t)[:k].sort().values for _ in range(h)])[None]
    _, got = merge_values(keys, values, keep, None, 0.0, 1.0)
    for head in range(h):
        kept = keep[0, head].tolist()
        acc_v = {j: torch.zeros(d) for j in kept}
        acc_w = dict.fromkeys(kept, 0.0)
        for e in range(t):
            if e in kept:
                continue
            sims = [torch.nn.functional.cosine_similarity(keys[0, head, e], keys[0, head, j], dim=0) for j in kept]
            j = kept[int(torch.stack(sims).argmax())]
            ne, nt = values[0, head, e].norm(), values[0, head, j].norm()
            w = max(float(max(sims)), 0.0) * float(ne / (ne + nt + 1e-6))
            acc_v[j] += w * values[0, head, e]
            acc_w[j] += w
        for i, j in enumerate(kept):
            want = (values[0, head, j] + acc_v[j]) / (1 + acc_w[j]) if acc_w[j] > 0 else values[0, head, j]
            torch.testing.assert_close(got[0, head, i], want, rtol=1e-5, atol=1e-6)


def test_merging_threshold_and_fraction_merge_less():
    torch.manual_seed(1)
    keys, values = torch.randn(1, 1, 30, 8), torch.randn(1, 1, 30, 8)
    keep = torch.arange(0, 30, 3)[None, None]
    changed = []
    for thr, frac in ((0.0, 1.0), (0.0, 0.5), (0.9, 1.0)):
        _, v = merge_values(keys, values, keep, None, thr, frac)
        changed.append(int((v != values[:, :, ::3]).any(-1).sum()))
    assert changed[0] > changed[1] and changed[0] > changed[2] >= 0


# --- chunkkv ----------------------------------------------------------------------------------------------------------
def naive_chunkkv(tokens: list[float], length: int, budget: int) -> set[int]:
    chunks = [list(range(s, min(s + length, len(tokens)))) for s in range(0, len(tokens), length)]
    means = [sum(tokens[i] for i in c) / len(c) for c in chunks]
    kept: set[int] = set()
    for c in sorted(range(len(chunks)), key=lambda c: -means[c]):
        room = budget - len(kept)
        kept |= set(sorted(chunks[c], key=lambda i: -tokens[i])[:room])
    return kept


def test_chunkkv_keeps_whole_chunks_by_mean_head_summed_score():
    obs = observation(t=23, budget=11)
    obs.positions = obs.positions[..., torch.randperm(23, generator=torch.Generator().manual_seed(3))].contiguous()
    method = build("chunkkv(chunk_length=5):knorm")
    scores = method.score(obs)
    tokens_by_pos = {}
    inner = build("knorm").score(obs).sum(dim=1)[0]
    for slot, pos in enumerate(obs.positions[0, 0].tolist()):
        tokens_by_pos[pos] = float(inner[slot])
    want_pos = naive_chunkkv([tokens_by_pos[p] for p in range(23)], 5, 11)
    for head_kept in kept_by(scores, 11):
        assert {int(obs.positions[0, 0, s]) for s in head_kept} == want_pos


def naive_entropy_chunkkv(tokens: list[float], length: int, spiky: int, budget: int) -> set[int]:
    n = len(tokens)
    bounds = [(s, min(s + length, n)) for s in range(0, n, length)]
    means, ents = [], []
    for s, e in bounds:
        part = tokens[s:e]
        means.append(sum(part) / len(part))
        if len(part) == 1:
            ents.append(0.0)
            continue
        base = min(min(part), 0.0)
        q = [x - base for x in part]
        p = [x / (sum(q) + 1e-8) for x in q]
        ents.append(min(max(-sum(x * math.log(x + 1e-8) for x in p) / math.log(len(part)), 0.0), 1.0))
    med_s = float(torch.tensor(means).median())
    med_e = float(torch.tensor(ents).median())
    kept: set[int] = set()
    left = budget
    for c in sorted(range(len(bounds)), key=lambda c: -means[c]):
        if left <= 0:
            break
        s, e = bounds[c]
        k = min(e - s, left)
        if means[c] >= med_s and ents[c] < med_e:
            k = min(k, spiky)
        kept |= set(sorted(range(s, e), key=lambda i: -tokens[i])[:k])
        left -= k
    rest = sorted(set(range(n)) - kept, key=lambda i: -tokens[i])
    return kept | set(rest[: budget - len(kept)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_chunkkv_follows_kvpress_greedy_pass(seed):
    obs = observation(t=37, budget=15, seed=seed)
    spiky = torch.rand(1, 2, 37, generator=torch.Generator().manual_seed(seed))
    spiky[..., 3] = 30.0  # one spike: an important, low-entropy chunk
    obs.attention = spiky.repeat_interleave(2, dim=1)
    method = build("entropy_chunkkv(chunk_length=6, spiky_keep=2):snapkv(window=1, kernel=1)")
    inner = build("snapkv(window=1, kernel=1)").score(obs)
    inner = torch.where(torch.isinf(inner), inner[torch.isfinite(inner)].max() + 1, inner)
    tokens = inner.sum(dim=1)[0].tolist()
    want = naive_entropy_chunkkv(tokens, 6, 2, 15)
    for head_kept in kept_by(method.score(obs), 15):
        assert head_kept == want


# --- critical_adakv -------------------------------------------------------------------------------------------------
def test_projected_value_norms_are_the_l1_norm_of_w_o_v_averaged_over_the_group():
    torch.manual_seed(0)
    h, g, d, hidden, t = 2, 3, 4, 10, 7
    values = torch.randn(1, h, t, d)
    o_proj = torch.randn(hidden, h * g * d)
    got = projected_value_norms(values, o_proj, 0, g)
    for j in range(h):
        per_q = [(values[0, j] @ o_proj[:, (j * g + i) * d : (j * g + i + 1) * d].T).abs().sum(-1) for i in range(g)]
        torch.testing.assert_close(got[0, j], torch.stack(per_q).mean(0))


def naive_critical_adakv(scores, norms, n_kept, alpha, eps, first):
    """kvpress's CriticalAdaKVPress.compress, on (H, T) scores without ties, returning kept sets per head."""
    h, t = scores.shape
    big = torch.finfo(torch.float64).max / 10
    s = scores.clone().double()
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    for i in range(h):
        s[i, s[i].topk(n_safe).indices] = big
    flat = s.reshape(-1).topk(n_kept * h).indices
    budgets = [int((flat // t == i).sum()) for i in range(h)]
    for i in range(h):
        s[i, s[i].topk(int(budgets[i] * first)).indices] = big
    s2 = (s + eps) * norms.double()
    return [set(s2[i].topk(budgets[i]).indices.tolist()) for i in range(h)]


@pytest.mark.parametrize("alpha,first", [(0.2, 0.5), (0.5, 0.0), (0.0, 1.0)])
def test_critical_adakv_matches_kvpress_two_stage_selection(alpha, first):
    torch.manual_seed(4)
    h, t, budget = 3, 40, 9
    scores = torch.rand(h, t) * torch.tensor([[3.0], [1.0], [0.3]])
    norms = torch.rand(h, t) + 0.5
    got = critical_ada_select(list(scores), list(norms), budget, alpha, 1e-4, first)
    want = naive_critical_adakv(scores, norms, budget, alpha, 1e-4, first)
    assert sum(len(k) for k in got) == budget * h
    assert [set(k.tolist()) for k in got] == want


def test_critical_adakv_runs_live_and_splits_heads():
    model = make_model("llama")
    with Sieve("critical_adakv:snapkv(window=4)", compression=0.5).attach(model) as cache, torch.no_grad():
        model(prompt_ids(40), **cache_kwargs(model, cache))
        per_layer = cache.kv_tokens()
    assert all(sum(p) == 40 if isinstance(p, list) else p == 20 for p in per_layer)


# --- per_layer ------------------------------------------------------------------------------------------------------
def test_per_layer_at_the_mean_ratio_is_kvpress_per_layer_ratios():
    method = build("per_layer(ratios=(0.1, 0.3, 0.5, 0.7)):knorm")
    seen = 1000
    budget = int(seen * (1 - 0.4))
    got = [method.layer_budget(budget, LayerContext(i, 4, seen, seen)) for i in range(4)]
    assert all(abs(g - seen * (1 - r)) <= 1 for g, r in zip(got, (0.1, 0.3, 0.5, 0.7), strict=True))
    assert [method.layer_budget(seen, LayerContext(i, 4, seen, seen)) for i in range(4)] == [seen] * 4
    with pytest.raises(KVSieveError, match="one per layer"):
        method.layer_budget(budget, LayerContext(0, 3, seen, seen))


# --- rerotate -------------------------------------------------------------------------------------------------------
def test_rerotate_around_streaming_llm_without_rotation_is_streaming_llm():
    model = make_model("llama")
    ids = prompt_ids(40)

    def logits(spec):
        with Sieve(spec, budget=12, interval=1).attach(model) as cache, torch.no_grad():
            out = [model(ids, **cache_kwargs(model, cache)).logits[:, -1]]
            for _ in range(6):
                nxt = out[-1].argmax(-1, keepdim=True)
                out.append(model(nxt, **cache_kwargs(model, cache)).logits[:, -1])
        return torch.stack(out)

    a, b = logits("streaming_llm(n_sink=2)"), logits("rerotate:streaming_llm(n_sink=2, rerotate=False)")
    assert torch.equal(a, b)
    assert not torch.equal(a, logits("streaming_llm(n_sink=2, rerotate=False)"))  # positions matter
    with pytest.raises(KVSieveError, match="same number of tokens"):
        build("rerotate:adakv:snapkv")


# --- simlayerkv -----------------------------------------------------------------------------------------------------
def test_simlayerkv_laziness_is_kvpress_attention_share_test():
    attn = torch.rand(1, 4, 30)
    attn = attn / attn.sum(dim=-1, keepdim=True)  # one query's attention per head sums to 1
    obs = observation(t=30, budget=10, attention=attn, q=1)
    share = attn.sum(dim=(0, 1)) / 4
    want = float(share[:4].sum() + share[-6:].sum())
    for threshold, lazy in ((want - 1e-4, True), (want + 1e-4, False)):
        method = build(f"simlayerkv(threshold={threshold}, n_last=1, n_initial=4)")
        assert method.lazy(obs) is lazy


def test_simlayerkv_busy_layers_keep_everything_lazy_layers_stream():
    model = make_model("llama")
    for threshold, want in ((1.0, [40, 40]), (0.0, [12, 12])):
        with Sieve(f"simlayerkv(threshold={threshold}, n_initial=2)", budget=12).attach(model) as cache:
            with torch.no_grad():
                model(prompt_ids(40), **cache_kwargs(model, cache))
            assert cache.kv_tokens() == want
            if threshold == 0.0:
                held = cache.sieve_layers()[0].segments[0].positions[0, 0].sort().values.tolist()
                assert held == [0, 1, *range(30, 40)]


# --- dms --------------------------------------------------------------------------------------------------------------
def test_dms_evicts_below_threshold_outside_the_window_under_its_cap():
    method = build("dms(threshold=0.5, window=3):knorm")
    ctx = LayerContext(0, 2, 12, 12)
    assert method.layer_budget(8, ctx) == 3  # eviction is due once the window is exceeded
    frozen = torch.tensor([[[0.9, 0.1, 0.7, 0.2, 0.6, 0.55, 0.1, 0.0, 0.8, 0.1, 0.1, 0.1],
                            [0.1] * 12]])  # fmt: skip
    obs = observation(t=12, h=2)
    obs.state["dms_scores"] = frozen
    picks = method.select([method.score(obs)], 3, ctx)
    assert sorted(picks[0].flatten().tolist()) == [0, 2, 4, 5, 8, 9, 10, 11]  # 8 = the cap: all fit
    assert sorted(picks[1].flatten().tolist()) == [9, 10, 11]  # only the window
    ctx.layer_state["dms_cap"] = 6
    picks = method.select([method.score(obs)], 3, ctx)
    assert sorted(picks[0].flatten().tolist()) == [0, 2, 8, 9, 10, 11]  # capped: the best six


def test_dms_scores_are_frozen_when_tokens_arrive():
    model = make_model("llama")
    with Sieve("dms(threshold=-0.6, window=8):knorm", compression=0.0).attach(model) as cache, torch.no_grad():
        model(prompt_ids(40), **cache_kwargs(model, cache))
        layer = cache.sieve_layers()[0]
        per_head = layer.tokens_per_head()
        for seg in layer.segments:
            s = seg.state["dms_scores"]
            assert torch.equal(s, -seg.keys.norm(dim=-1))  # knorm of each kept key, frozen
            recent = seg.positions >= 32
            assert bool(((s >= -0.6) | recent).all())  # every kept token passed the threshold or is recent
    assert min(per_head) < 40 and all(n >= 8 for n in per_head)


# --- finch ------------------------------------------------------------------------------------------------------------
def test_finch_votes_are_normalised_window_attention():
    torch.manual_seed(2)
    b, h, g, q, t, d, w = 1, 2, 2, 6, 15, 4, 3
    queries, keys = torch.randn(b, h * g, q, d), torch.randn(b, h, t, d)
    got = window_votes(queries, keys, 0.5, None, w, True)
    want = torch.zeros(b, h, t)
    for head in range(h * g):
        for i in range(q - w, q):
            pos = t - q + i  # the query's slot: it sees keys 0..pos
            logits = (queries[0, head, i] @ keys[0, head // g, : pos + 1].T) * 0.5
            want[0, head // g, : pos + 1] += logits.softmax(-1) * pos / (w * g)
    torch.testing.assert_close(got, want)


def test_finch_compresses_at_the_question_after_a_paused_context():
    model = make_model("llama")
    context, question = prompt_ids(40), prompt_ids(6, seed=5)
    with Sieve("finch", compression=0.5).attach(model) as cache, torch.no_grad():
        with cache.paused():
            model(context, **cache_kwargs(model, cache))
        model(question, **cache_kwargs(model, cache))
        assert cache.kv_tokens() == [23, 23]
        seg = cache.sieve_layers()[0].segments[0]
        assert set(range(40, 46)) <= set(seg.positions[0, 0].tolist())  # the question is the window: kept
    with Sieve("finch", compression=0.5).attach(model) as cache, pytest.raises(KVSieveError, match="paused"):
        model(context, **cache_kwargs(model, cache))


# --- cam --------------------------------------------------------------------------------------------------------------
def test_cam_spreads_each_evicted_value_over_the_kept_tokens_after_it():
    torch.manual_seed(3)
    h, t, d, m = 1, 10, 4, 3
    positions = torch.arange(t)[None]
    values = torch.randn(h, t, d)
    keep = torch.tensor([[0, 2, 3, 5, 8]])
    evicted = torch.tensor([[1, 4, 6, 7, 9]])
    attention = torch.tensor([[1.0, 5.0, 1.0, 1.0, 0.0, 1.0, 9.0, 0.0, 1.0, 3.0]])  # p = 1, 0, 1, 0, and 9 has none
    gen = torch.Generator().manual_seed(0)
    got = cam_contributions(positions, values, attention, keep, evicted, torch.ones(1, 5, dtype=torch.bool), m, gen)
    want = torch.zeros(1, 5, d)
    kept = keep[0].tolist()
    for e in (1, 6):  # merged with probability 1; 4 and 7 have no attention (p = 0); 9 has no kept token after it
        window = [i for i, s in enumerate(kept) if s > e][:m]
        for i in window:
            want[0, i] += values[0, e] / len(window)
    torch.testing.assert_close(got, want)


def test_cam_merges_during_decoding_and_repeats_with_its_seed():
    model = make_model("llama")

    def run(seed):
        with Sieve(f"cam(merge_budget=4, seed={seed}):knorm", budget=16, interval=4).attach(model) as cache:
            with torch.no_grad():
                out = model(prompt_ids(30), **cache_kwargs(model, cache)).logits[:, -1]
                for _ in range(12):
                    out = model(out.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
            return [s.values.clone() for layer in cache.sieve_layers() for s in layer.segments]

    def plain():
        with Sieve("knorm", budget=16, interval=4).attach(model) as cache, torch.no_grad():
            out = model(prompt_ids(30), **cache_kwargs(model, cache)).logits[:, -1]
            for _ in range(12):
                out = model(out.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
            return [s.values.clone() for layer in cache.sieve_layers() for s in layer.segments]

    a, b = run(0), run(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, plain(), strict=True))  # values were merged


# --- compose ----------------------------------------------------------------------------------------------------------
def test_compose_applies_stages_in_sequence_on_what_the_previous_kept():
    obs = observation(t=30, budget=8)
    method = build("compose(methods=('random(seed=3)', 'knorm'), ratios=(0.5,))")
    got = kept_by(method.score(obs), 8)
    first = build("random(seed=3)").score(obs)
    norms = -obs.keys.norm(dim=-1)
    for head in range(2):
        stage1 = first[0, head].topk(15).indices  # int(30 x 0.5)
        stage2 = stage1[norms[0, head, stage1].topk(8).indices]
        assert got[head] == set(stage2.tolist())


def test_compose_refuses_what_it_cannot_chain():
    with pytest.raises(KVSieveError, match="different attention"):
        build("compose(methods=('snapkv', 'tova'))")
    with pytest.raises(KVSieveError, match="decides select"):
        build("compose(methods=('adakv:snapkv', 'knorm'))")
    with pytest.raises(KVSieveError, match="last stage"):
        build("compose(methods=('think', 'knorm'))")


# --- think ------------------------------------------------------------------------------------------------------------
def test_think_channel_scores_are_kvpress_query_key_norm_products():
    torch.manual_seed(5)
    qn, keys = torch.rand(1, 2, 8), torch.randn(1, 2, 20, 8)
    got = kept_channels(qn, keys, None, 0.5)
    for h in range(2):
        score = [float(qn[0, h, c] * keys[0, h, :, c].pow(2).mean()) for c in range(8)]
        assert got[0, h].tolist() == sorted(sorted(range(8), key=lambda c: -score[c])[:4])


def test_channel_pruned_storage_reads_zeros_and_holds_fewer_bytes():
    torch.manual_seed(6)
    keys, values = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    seg = Segment(0, keys, values, torch.arange(10).expand(1, 2, 10).clone())
    channels = torch.tensor([[[0, 3, 4, 7], [1, 2, 5, 6]]])
    packed = ChannelPrunedSegment(seg, channels)
    want = torch.zeros_like(keys)
    want.scatter_(
        -1, channels[:, :, None].expand(-1, -1, 10, -1), keys.gather(-1, channels[:, :, None].expand(-1, -1, 10, -1))
    )
    k, v = packed.read()
    assert torch.equal(k, want) and torch.equal(v, values)
    assert packed.nbytes() == seg.nbytes() - keys.nbytes // 2 + channels.numel() * 2  # keys halved, + int16 index
    packed.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.arange(10, 13).expand(1, 2, 3), None)
    packed.gather(torch.tensor([[[0, 4, 10, 11], [2, 3, 4, 12]]]))  # heads keep different numbers of pruned tokens
    k2, _ = packed.read()
    assert torch.equal(k2[0, 0, :2], want[0, 0, [0, 4]]) and torch.equal(k2[0, 1, :3], want[0, 1, [2, 3, 4]])
    assert packed.positions[0, 1].tolist() == [2, 3, 4, 12]


def test_think_frees_key_memory_on_a_live_model():
    model = make_model("llama")
    with Sieve("full").attach(model) as cache, torch.no_grad():
        model(prompt_ids(40), **cache_kwargs(model, cache))
        full = cache.kv_bytes()
    with Sieve("think(ratio=0.5)").attach(model) as cache, torch.no_grad():
        model(prompt_ids(40), **cache_kwargs(model, cache))
        assert cache.kv_bytes() < full * 0.77
        pruned = cache.kv_bytes()
        model(prompt_ids(1, seed=4), **cache_kwargs(model, cache))  # decoding appends full-width keys
        assert cache.kv_bytes() - pruned == full // 40


# --- lukv -------------------------------------------------------------------------------------------------------------
def test_lukv_hull_greedy_buys_the_steepest_segments_first():
    concave = torch.tensor([0.0, 3.0, 5.0, 6.0, 6.5])
    convex = torch.tensor([0.0, 0.1, 0.2, 4.0, 4.1])  # its hull jumps straight to b = 3
    assert _hull_segments(convex)[0] == pytest.approx((4.0 / 3.0, 3.0))
    curve = allocation_curve([concave, convex], 4)
    # keep 50% of 2 x 4 tokens: slopes 3, 2 (concave), 1.33 x 3 (convex hull), ...: buy 3 + 2 -> 2 of concave
    assert curve[49].tolist() == pytest.approx([2 / 4, 2 / 4])
    total = (1 - 0.25) * 8
    assert float(curve[24].sum()) * 4 == pytest.approx(total)


def test_lukv_allocate_is_proportional_capped_and_exact():
    assert allocate(torch.tensor([3.0, 1.0]), 8, [10, 10]) == [6, 2]
    assert allocate(torch.tensor([3.0, 1.0]), 8, [5, 10]) == [5, 3]  # the cap's surplus goes to the other head
    assert sum(allocate(torch.tensor([1.0, 1.0, 1.0]), 10, [9, 9, 9])) == 10


def test_lukv_calibrates_a_curve_and_uses_it(tmp_path):
    from kvsieve.methods.lukv import calibrate

    model = make_model("llama")
    path = calibrate(model, [prompt_ids(48, seed=s) for s in (1, 2)], tmp_path / "curve.json", scorer="knorm")
    method = build(f"lukv(curve={str(path)!r}):knorm")
    with Sieve(method, compression=0.5).attach(model) as cache, torch.no_grad():
        model(prompt_ids(40), **cache_kwargs(model, cache))
        held = cache.kv_tokens()
    assert sum(sum(p) if isinstance(p, list) else 2 * p for p in held) == pytest.approx(2 * 2 * 20, abs=2)


# --- periodic decode-time compression (item 5) ----------------------------------------------------------------------
@pytest.mark.parametrize("spec,interval", [("knorm", 1), ("snapkv(window=8)", 64)])
def test_periodic_budget_holds_at_most_target_plus_interval_minus_one_over_1000_steps(spec, interval):
    model = make_model("llama")
    budget, steps = 48, 1000
    history = []
    with Sieve(spec, budget=budget, interval=interval).attach(model) as cache, torch.no_grad():
        out = model(prompt_ids(64), **cache_kwargs(model, cache)).logits[:, -1]
        assert cache.kv_tokens() == [budget, budget]
        for _ in range(steps):
            out = model(out.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
            history.append(max(cache.kv_tokens()))
    assert len(history) == steps
    assert max(history) <= budget + interval - 1
    assert min(history) >= budget
    if interval > 1:  # it does hold more between evictions, and comes back to the target at each one
        assert max(history) == budget + interval - 1 and history.count(budget) >= steps // interval - 1
