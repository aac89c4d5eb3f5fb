"""kvgrad, kvcompose, taskkv and actqkv against naive references written from their formulas.

kvgrad and kvcompose score with extra passes of the model, so their references run the tiny model with transformers'
own eager attention and a ``DynamicCache`` (attention weights from ``output_attentions``, gradients from autograd);
taskkv's and actqkv's references are loops over random tensors.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

import kvsieve
from kvsieve import KVSieveError, Sieve, build
from kvsieve.methods.actqkv import cutoff, probe_query
from kvsieve.methods.base import Observation
from kvsieve.methods.taskkv import head_distances
from kvsieve.reconstruction import repeat_prompts
from kvsieve.snapshot import shareable
from tiny_models import make_model, prompt_ids

N = 40  # context tokens


class _Tokenizer:
    """One id per character (the tiny models have no tokenizer)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [3 + ord(c) % 90 for c in text]})()


def _eager(arch: str = "llama") -> torch.nn.Module:
    model = make_model(arch)
    model.set_attn_implementation("eager")
    return model


def _value_norms(model, cache: DynamicCache, layer: int) -> torch.Tensor:
    """``||v_c W_o^j||_2`` per query head ``j``: ``(Hq, n)``."""
    attn = model.model.layers[layer].self_attn
    values = cache.layers[layer].values[0, :, :N]  # (H_kv, n, D): the context's
    hq, d = model.config.num_attention_heads, values.shape[-1]
    g = hq // values.shape[0]
    w = attn.o_proj.weight.view(-1, hq, d)  # (hidden, Hq, D)
    return torch.stack([(values[j // g] @ w[:, j].T).norm(dim=-1) for j in range(hq)])


# --- kvgrad ---------------------------------------------------------------------------------------------------------
def _kvgrad_reference(ids: torch.Tensor) -> list[torch.Tensor]:
    """S_{l,c} = max_{p, query head} A_{p,c} ||v_c W_O|| ||dPhi/da_p||, one repeat pass over the whole context."""
    model = _eager()
    (_, prompt), *_ = list(repeat_prompts(ids[0], 10_000, _Tokenizer(), *_KVZIP_PROMPTS))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    captured: dict = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
             for i, layer in enumerate(model.model.layers)]  # fmt: skip
    hooks.append(model.model.layers[-1].register_forward_hook(lambda m, a, o: captured.__setitem__("final", o)))
    embeds = model.model.embed_tokens(prompt[None]).detach().requires_grad_(True)
    model(inputs_embeds=embeds, past_key_values=cache, output_attentions=True)
    for hook in hooks:
        hook.remove()
    final = captured["final"][0] if isinstance(captured["final"], tuple) else captured["final"]
    phi = final.square().sum()
    n_layers = len(model.model.layers)
    grads = torch.autograd.grad(phi, [captured[i][0] for i in range(n_layers)])
    out = []
    for layer in range(n_layers):
        attention = captured[layer][1][0].detach()  # (Hq, q, n + q)
        grad_norm = grads[layer][0].norm(dim=-1)  # (q,)
        vnorm = _value_norms(model, cache, layer).detach()  # (Hq, n)
        hq, kv = attention.shape[0], model.config.num_key_value_heads
        g = hq // kv
        per_query_head = [(attention[j, :, :N] * vnorm[j] * grad_norm[:, None]).amax(dim=0) for j in range(hq)]
        out.append(torch.stack([torch.stack(per_query_head[h * g : (h + 1) * g]).amax(dim=0) for h in range(kv)]))
    return out


_KVZIP_PROMPTS = ("\n\nRepeat the previous context exactly.",
                  "\n\nRepeat the part of the previous context exactly, starting with", 8)  # fmt: skip


def test_kvgrad_scores_are_attention_times_value_norm_times_gradient_norm():
    ids = prompt_ids(N)
    reference = _kvgrad_reference(ids)
    model = make_model("llama")
    method = build("kvgrad(chunk=64)")
    assert not shareable(method)
    with Sieve(method, compression=0.1).attach(model) as cache:
        kvsieve.prefill(model, ids, cache, tokenizer=_Tokenizer())
        assert not any(seg.keys.requires_grad for layer in cache.sieve_layers() for seg in layer.segments)
        assert all(p.requires_grad for p in model.parameters())  # frozen only during the passes
        for idx, layer in enumerate(cache.sieve_layers()):
            for seg in layer.segments:
                want = reference[idx][seg.head_start : seg.head_start + seg.n_heads][None].gather(-1, seg.positions)
                torch.testing.assert_close(seg.state["kvzip"], want, rtol=2e-3, atol=1e-6)


def test_kvgrad_keeps_the_model_wide_budget_and_refuses_where_gradients_are_impossible():
    model = make_model("llama")
    ids = prompt_ids(60)
    with Sieve(build("kvgrad(chunk=25)"), compression=0.5).attach(model) as cache:
        kvsieve.prefill(model, ids, cache, tokenizer=_Tokenizer())
        held = [sum(t) if isinstance(t, list) else 2 * t for t in cache.kv_tokens()]
        assert sum(held) == 2 * 2 * 30
    with torch.inference_mode(), Sieve(build("kvgrad"), compression=0.5).attach(model) as cache:
        with pytest.raises(KVSieveError, match=r"needs gradients.*inference_mode"):
            kvsieve.prefill(model, ids, cache, tokenizer=_Tokenizer())
        assert cache.kv_tokens()[1] == 0  # refused at the first layer, before the rest of the prefill
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    try:
        with Sieve(build("kvgrad"), compression=0.5).attach(model) as cache, pytest.raises(KVSieveError, match="quant"):
            kvsieve.prefill(model, ids, cache, tokenizer=_Tokenizer())
    finally:
        del model.config.quantization_config
    o_proj = model.model.layers[0].self_attn.o_proj
    weight = o_proj.weight
    o_proj.weight = torch.nn.Parameter(weight.detach().to(torch.int8), requires_grad=False)  # as int8 checkpoints
    try:
        with Sieve(build("kvgrad"), compression=0.5).attach(model) as cache, pytest.raises(KVSieveError, match="quant"):
            kvsieve.prefill(model, ids, cache, tokenizer=_Tokenizer())
        assert cache.kv_tokens()[1] == 0  # refused at the first layer
    finally:
        o_proj.weight = weight


# --- kvcompose ------------------------------------------------------------------------------------------------------
def _kvcompose_reference(ids: torch.Tensor) -> list[torch.Tensor]:
    """Per KV head: max over the second pass's queries of the attention on each context token, mean over the group,
    plus the mean over the layer's KV heads: ``(H_kv, n)`` per layer."""
    model = _eager()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        attentions = model(ids, past_key_values=cache, output_attentions=True).attentions
    out = []
    kv = model.config.num_key_value_heads
    for att in attentions:
        per_query_head = att[0, :, :, :N].amax(dim=1)  # (Hq, n)
        g = per_query_head.shape[0] // kv
        heads = torch.stack([per_query_head[h * g : (h + 1) * g].mean(dim=0) for h in range(kv)])
        out.append(heads + heads.mean(dim=0, keepdim=True))
    return out


def _composite_counts(scores: list[torch.Tensor], budget: int, structured: bool) -> list:
    """kvpress's allocation, written out: sorted curves, mean over heads, first layer raised, global top-k."""
    curves = [s.sort(dim=-1, descending=True).values for s in scores]
    if structured:
        rows = [c.mean(dim=0) for c in curves]
        rows[0] = torch.stack(rows).amax(dim=0)
        n_rows_share = [(i, v) for i, r in enumerate(rows) for v in r.tolist()]
        total = budget * len(rows)
    else:
        n_rows_share = [((i, h), v) for i, c in enumerate(curves) for h in range(c.shape[0]) for v in c[h].tolist()]
        total = budget * sum(c.shape[0] for c in curves)
    ranked = sorted(n_rows_share, key=lambda item: -item[1])[:total]
    counts: dict = {}
    for owner, _ in ranked:
        counts[owner] = counts.get(owner, 0) + 1
    if structured:
        return [counts.get(i, 0) for i in range(len(scores))]
    return [[counts.get((i, h), 0) for h in range(c.shape[0])] for i, c in enumerate(curves)]


@pytest.mark.parametrize("structured", [True, False])
def test_kvcompose_scores_and_allocation_follow_kvpress(structured):
    ids = prompt_ids(N)
    reference = _kvcompose_reference(ids)
    model = make_model("llama")
    method = build(f"kvcompose(structured={structured})")
    assert not shareable(method)
    with Sieve(method, compression=0.5).attach(model) as cache:
        kvsieve.prefill(model, ids, cache)
        for idx, layer in enumerate(cache.sieve_layers()):
            for seg in layer.segments:
                want = reference[idx][seg.head_start : seg.head_start + seg.n_heads][None].gather(-1, seg.positions)
                torch.testing.assert_close(seg.state["kvcompose"], want, rtol=1e-4, atol=1e-6)
                # each head keeps its own best tokens
                kept = set(seg.positions[0, 0].tolist())
                best = reference[idx][seg.head_start].topk(len(kept)).indices.tolist()
                assert kept == set(best)
        counts = _composite_counts(reference, N // 2, structured)
        if structured:
            assert cache.kv_tokens() == [max(1, c) for c in counts]
        else:
            assert cache.kv_tokens() == [[max(1, c) for c in layer] for layer in counts]


# --- taskkv ---------------------------------------------------------------------------------------------------------
def _random_obs(seed: int, t: int = 24, h: int = 2, g: int = 2, d: int = 8, n_new: int = 24) -> Observation:
    gen = torch.Generator().manual_seed(seed)
    return Observation(
        layer_idx=0, n_layers=1, keys=torch.randn(1, h, t, d, generator=gen),
        values=torch.randn(1, h, t, d, generator=gen), queries=torch.randn(1, h * g, n_new, d, generator=gen),
        positions=torch.arange(t).expand(1, h, t).clone(), valid=None, attention=None, state={}, n_new=n_new,
        scaling=d**-0.5, budget=10, seen=t,
    )  # fmt: skip


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_taskkv_distances_are_of_projected_head_outputs_to_their_mean(distance):
    obs = _random_obs(3)
    hidden, window = 12, 5
    w_o = torch.randn(hidden, 4 * 8, generator=torch.Generator().manual_seed(4))
    got = head_distances(obs, w_o, window, distance)
    t = obs.keys.shape[2]
    vectors = []
    for j in range(4):
        kv = j // 2
        rows = []
        for i in range(t - window, t):  # query i sees keys 0..i
            probs = torch.softmax(obs.queries[0, j, i - (t - obs.n_new)] @ obs.keys[0, kv, : i + 1].T * obs.scaling, 0)
            rows.append((probs @ obs.values[0, kv, : i + 1]) @ w_o[:, j * 8 : (j + 1) * 8].T)
        vectors.append(torch.stack(rows).mean(dim=0))
    vectors = torch.stack(vectors)
    centre = vectors.mean(dim=0)
    if distance == "cosine":
        dist = 1 - torch.nn.functional.cosine_similarity(vectors, centre[None], dim=-1)
    else:
        dist = (vectors - centre).norm(dim=-1)
    torch.testing.assert_close(got, torch.stack([dist[:2].max(), dist[2:].max()]), rtol=1e-4, atol=1e-5)


def test_taskkv_heterogeneous_heads_keep_all_and_the_others_sinks_middle_and_recent():
    model = make_model("llama")
    ids = prompt_ids(N)
    method = build("taskkv(ratio=0.5, window=8, n_sink=2, middle=0.5)")
    with Sieve(method, budget=12).attach(model) as cache:
        kvsieve.prefill(model, ids, cache)
        for layer in cache.sieve_layers():
            flags = layer.layer_state["taskkv_heterogeneous"]
            assert int(flags.sum()) == 1
            held = layer.tokens_per_head()
            for h, het in enumerate(flags.tolist()):
                assert held[h] == (N if het else 12)
            streaming = int((~flags).nonzero()[0])
            seg = next(s for s in layer.segments if s.head_start <= streaming < s.head_start + s.n_heads)
            pos = set(seg.positions[0, streaming - seg.head_start].tolist())
            assert {0, 1} <= pos  # sinks
            assert set(range(N - 5, N)) <= pos  # 12 - 2 sinks = 10; half middle activations, 5 recent
    with pytest.raises(KVSieveError, match="batch size 1"), Sieve(method, budget=12).attach(model) as cache:
        kvsieve.prefill(model, prompt_ids(N, batch=2), cache)


# --- actqkv ---------------------------------------------------------------------------------------------------------
def test_actqkv_probe_weights_queries_by_their_distance_to_the_window_mean():
    window = torch.randn(1, 3, 6, 8, generator=torch.Generator().manual_seed(5))
    got = probe_query(window)
    for j in range(3):
        mean = window[0, j].mean(dim=0)
        bias = torch.stack([(window[0, j, i] - mean).norm() for i in range(6)])
        want = sum(bias[i] * window[0, j, i] for i in range(6)) / bias.sum()
        torch.testing.assert_close(got[0, j], want, rtol=1e-5, atol=1e-6)
    flat = torch.ones(1, 1, 4, 8)  # no bias anywhere: the plain mean
    torch.testing.assert_close(probe_query(flat), torch.ones(1, 1, 8))


def test_actqkv_cutoff_is_the_fewest_tokens_reaching_the_density_in_every_head():
    relevance = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]])
    assert cutoff(relevance[:, :1], 0.8) == 2
    assert cutoff(relevance[:, 1:], 0.8) == 4
    assert cutoff(relevance, 0.8) == 4  # the layer reads what its most diffuse head needs
    assert cutoff(relevance[:, :1], 0.5) == 1


def test_actqkv_reads_edges_plus_the_probes_top_tokens_up_to_the_cutoff():
    obs = _random_obs(6, t=30, n_new=1)
    method = build("actqkv(window=4, n_init=2, n_local=3, density=0.6)")
    seen = torch.randn(1, 4, 3, 8, generator=torch.Generator().manual_seed(7))
    obs.layer_state[("actqkv", "window", 0, 2)] = {"queries": seen}
    got = method.reads(Observation(**{**obs.__dict__, "read_budget": 20}))
    window = torch.cat([seen, obs.queries], dim=2)  # the step's own query joins the window
    bias = (window - window.mean(dim=2, keepdim=True)).norm(dim=-1)
    probe = (bias[..., None] * window).sum(dim=2) / bias.sum(dim=-1, keepdim=True)
    edges = {0, 1, 27, 28, 29}
    relevance = []
    for h in range(2):
        per_q = [torch.softmax(probe[0, j] @ obs.keys[0, h].T * obs.scaling, 0) for j in (2 * h, 2 * h + 1)]
        relevance.append((per_q[0] + per_q[1]) / 2)
    rel = torch.stack(relevance)
    rel[:, sorted(edges)] = 0.0
    need = max(int((rel[h].sort(descending=True).values.cumsum(0) < 0.6 * rel[h].sum()).sum()) + 1 for h in range(2))
    k = min(need, 20 - 5)
    for h in range(2):
        want = edges | set(rel[h].topk(k).indices.tolist())
        assert set(got[0, h].tolist()) == want


def test_actqkv_around_an_evicting_method_passes_its_observations_on():
    model = make_model("llama")
    ids = prompt_ids(N)
    with Sieve(build("kvcompose"), compression=0.5).attach(model) as cache:
        kvsieve.prefill(model, ids, cache)
        alone = [[s.positions.tolist() for s in layer.segments] for layer in cache.sieve_layers()]
    with Sieve(build("actqkv(n_init=2, n_local=2, read_budget=10):kvcompose"), compression=0.5).attach(model) as cache:
        kvsieve.prefill(model, ids, cache)
        assert [[s.positions.tolist() for s in layer.segments] for layer in cache.sieve_layers()] == alone


def test_taskkv_streaming_heads_keep_sinks_then_recent_then_the_most_attended_middle_tokens():
    obs = _random_obs(8, t=30)
    obs.attention = torch.rand(1, 4, 30, generator=torch.Generator().manual_seed(9))  # votes of the window
    obs.layer_state["taskkv_heterogeneous"] = torch.tensor([True, False])
    method = build("taskkv(n_sink=3, middle=0.5)")
    obs = replace(obs, budget=13)
    scores = method.score(obs)
    keep = method.select([scores], 13, None)
    assert [k.shape[-1] for k in keep] == [30, 13]  # the heterogeneous head keeps every token
    votes = (obs.attention[0, 2] + obs.attention[0, 3]) / 2  # KV head 1's query heads, averaged
    sinks, recent = {0, 1, 2}, set(range(30 - 5, 30))  # 13 - 3 sinks = 10: 5 middle, 5 recent
    middle = [i for i in votes.argsort(descending=True).tolist() if i not in sinks | recent][:5]
    assert set(keep[1][0, 0].tolist()) == sinks | recent | set(middle)
