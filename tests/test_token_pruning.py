"""Token pruning on text models (the sequence action point) and the methods' scores against naive references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, build, list_methods
from kvsieve.methods.aim import bipartite_merge
from kvsieve.methods.gsearch import greedy_schedule
from kvsieve.methods.todre import k_center
from kvsieve.methods.transprune import transition_weight
from kvsieve.sequence import PASS, Stage, keep_top, protect, received_attention
from kvsieve.vision import VisionPruner
from tiny_models import make_model, prompt_ids

IN_LLM = {  # the in-LLM methods on a 2-layer text model, pruning after layer 0
    "aim": "aim(layer=0, keep=0.5, merge=1.0)",
    "fastv": "fastv(layer=0, keep=0.5)",
    "gsearch": "gsearch(layer=0, keep=0.5)",
    "psigmoid": "psigmoid(layer=0, keep=0.5)",
    "transprune": "transprune(layer=0, keep=0.5)",
}


def _in_llm() -> list[str]:
    names = [c.name for c in list_methods("sequence") if not issubclass(c, VisionPruner)]
    assert set(names) == set(IN_LLM), "add the new in-LLM method to IN_LLM"
    return [IN_LLM[n] for n in names]


def _run(model, cache, ids, steps=2):
    out = []
    with torch.no_grad():
        out.append(model(ids, past_key_values=cache).logits[:, -1])
        for _ in range(steps):
            out.append(model(out[-1].argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_in_llm_methods_prune_text_and_keep_everything_bitwise_at_keep_1(arch):
    model = make_model(arch)
    ids = prompt_ids(41)
    ref = _run(model, DynamicCache(config=model.config), ids)
    for spec in _in_llm():
        neutral = spec.replace("keep=0.5", "keep=1.0")
        with Sieve("full", sequence=neutral).attach(model) as cache:
            assert all(torch.equal(a, b) for a, b in zip(ref, _run(model, cache, ids), strict=True)), neutral
        with Sieve("full", sequence=spec).attach(model) as cache:
            _run(model, cache, ids, steps=1)
        assert cache.kv_tokens() == [42, 20 + 1 + 1], spec  # 40 candidates -> 20, + the last token, + one step


def test_protected_tokens_and_the_last_token_always_go_on(llama):
    ids = prompt_ids(40)
    prunable = torch.ones_like(ids, dtype=torch.bool)
    prunable[:, -8:] = False  # the question
    for spec in _in_llm():
        with Sieve("full", sequence=spec.replace("0.5", "0.25")).attach(llama) as cache, torch.no_grad():
            protect(cache, prunable)
            llama(ids, past_key_values=cache)
            kept = cache.layers[1].segments[0].positions[0, 0]
        assert set(range(32, 40)) <= set(kept.tolist()), spec
        assert kept.numel() == 8 + 32 // 4, spec  # a quarter of the 32 candidates


def test_pruning_is_deterministic_and_skips_paused_passes(llama):
    ids = prompt_ids(30)
    kept = []
    for _ in range(2):
        with Sieve("full", sequence="transprune(layer=0, keep=0.5)").attach(llama) as cache, torch.no_grad():
            llama(ids, past_key_values=cache)
            kept.append(cache.layers[1].segments[0].positions.clone())
            with cache.paused():  # a question appended after a compressed context is never pruned
                llama(prompt_ids(6, seed=3), past_key_values=cache)
            assert cache.kv_tokens()[1] == 15 + 6
    assert torch.equal(kept[0], kept[1])


def test_text_errors():
    llama = make_model("llama")
    for spec in ("visionzip", "hiprune", "fopru", "vtc_cls", "todre(layer=0)"):
        with pytest.raises(KVSieveError, match="no vision tower"), Sieve("full", sequence=spec).attach(llama):
            pass
    with (
        Sieve("full", sequence="fastv(layer=0, scope='image')").attach(llama) as cache,
        pytest.raises(KVSieveError, match="has none"),
    ):
        llama(prompt_ids(10), past_key_values=cache)
    with pytest.raises(KVSieveError, match="cannot exceed merge"):
        build("aim(keep=0.6, merge=0.5)")
    with pytest.raises(KVSieveError, match="schedule entries"):
        build("gsearch(schedule=((1, 1.5),))")
    with Sieve("full", sequence="fastv(layer=0)").attach(llama) as cache, pytest.raises(KVSieveError, match="marked"):
        protect(cache, torch.ones(1, 5, dtype=torch.bool))
        llama(prompt_ids(10), past_key_values=cache)


# --- scores against references written from the papers' formulas ---------------------------------------------------
def test_received_attention_equals_the_layers_eager_attention():
    model = make_model("llama")
    model.set_attn_implementation("eager")
    ids = prompt_ids(24)
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"], seen["emb"] = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]

    handle = model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    handle.remove()
    eager = out.attentions[1][0]  # (H, 24, 24)
    rows = torch.zeros(1, 24, dtype=torch.bool)
    rows[0, [5, 23]] = True
    got = received_attention(model.model.layers[1], seen["hidden"], seen["emb"], rows)
    torch.testing.assert_close(got[0], eager[:, [5, 23]].mean(dim=(0, 1)), rtol=1e-5, atol=1e-6)


def test_fastv_ranks_by_the_questions_pooled_attention_when_asked():
    """queries='instruction', pool=5: the question's attention at the pruning layer, averaged over 5 neighbours
    (fewer at the edges); the kept candidates are its top quarter. Reference: the eager attention of layer 0."""
    model = make_model("llama")
    model.set_attn_implementation("eager")
    ids = prompt_ids(40)
    prunable = torch.ones_like(ids, dtype=torch.bool)
    prunable[:, -8:] = False  # the question
    with torch.no_grad():
        eager = model(ids, output_attentions=True).attentions[0][0]  # (H, 40, 40)
    received = eager[:, 32:].mean(dim=(0, 1))[:32]  # what the question's 8 queries give the 32 candidates
    pooled = torch.stack([received[max(0, i - 2) : i + 3].mean() for i in range(32)])
    for spec, score in (
        ("fastv(layer=0, keep=0.25, queries='instruction', pool=5)", pooled),
        ("fastv(layer=0, keep=0.25, queries='instruction')", received),
    ):
        with Sieve("full", sequence=spec).attach(model) as cache, torch.no_grad():
            protect(cache, prunable)
            model(ids, past_key_values=cache)
            kept = cache.layers[1].segments[0].positions[0, 0].tolist()
        assert kept == sorted(score.topk(8).indices.tolist()) + list(range(32, 40)), spec
    with pytest.raises(KVSieveError, match="pool must be odd"):
        build("fastv(pool=4)")


def test_transition_weight_is_the_papers_ttv():
    gen = torch.Generator().manual_seed(0)
    before, after = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    ref = torch.empty(2, 7)
    for b in range(2):
        turn = [1 - float(before[b, i] @ after[b, i] / (before[b, i].norm() * after[b, i].norm())) for i in range(7)]
        total = sum(math.exp(t) for t in turn)
        for i in range(7):
            ref[b, i] = float(after[b, i].norm() / before[b, i].norm()) * math.exp(turn[i]) / total
    torch.testing.assert_close(transition_weight(before, after), ref, rtol=1e-5, atol=1e-7)


def test_k_center_is_greedy_farthest_point():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, generator=gen)
    got = k_center(x, 5)
    xn = F.normalize(x, dim=-1)
    chosen = [int((xn @ F.normalize(xn.mean(0), dim=0)).argmin())]
    while len(chosen) < 5:
        dist = torch.stack([1 - xn @ xn[c] for c in chosen]).min(dim=0).values
        dist[chosen] = -1
        chosen.append(int(dist.argmax()))
    assert got.tolist() == sorted(chosen)


def test_keep_top_keeps_non_candidates_and_the_best_candidates():
    scores = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0, 9.0]])
    cand = torch.tensor([[True, True, True, True, False, False]])
    rows = keep_top(scores, cand, torch.tensor([4]), 0.5)
    assert rows.tolist() == [[0, 2, 4, 5]]  # 2 of 4 candidates (ties: the earlier row), every non-candidate
    assert keep_top(scores, cand, torch.tensor([4]), 0.0).tolist() == [[4, 5]]


def test_bipartite_merge_reaches_the_target_and_averages_by_size():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    alive, feats = bipartite_merge(x, 5)
    assert alive.tolist() == [1, 2, 3, 4, 5]  # the most similar pair (0 -> 1) merged first, into its destination
    assert torch.allclose(feats[0], (x[0] + x[1]) / 2) and torch.equal(feats[1:], x[2:])
    alive, feats = bipartite_merge(x, 2)
    assert alive.numel() == 2 and bool((alive[1:] > alive[:-1]).all())


def test_greedy_schedule_finds_the_smallest_shares_layer_by_layer():
    limits = {1: 0.5, 3: 0.25}  # a fake model: the answer stays right down to these shares

    def unchanged(spec: str) -> bool:
        schedule = build(spec).schedule
        return all(keep >= limits[layer] for layer, keep in schedule)

    assert greedy_schedule(unchanged, [1, 3]) == ((1, 0.5), (3, 0.25))
    assert build("gsearch(schedule=((1, 0.5), (3, 0.25)))").stages(8) == [Stage(1, 0.5), Stage(3, 0.25)]


def test_progressive_stage_schedules():
    assert [s.after for s in build("transprune(layer=2, keep=0.25)").stages(30)] == [2, 4, 7]
    assert build("transprune(layer=2, keep=0.25)").stages(30)[-1].keep == 0.25
    shares = [s.keep for s in build("psigmoid(layer=2, keep=0.25)").stages(30)]
    assert shares == sorted(shares, reverse=True) and shares[-1] == 0.25
    aim = build("aim(layer=2, keep=0.25, merge=0.5)").stages(12)
    assert aim[0] == Stage(-1, 0.5) and aim[-1] == Stage(10, 0.25)


def test_pass_state_is_cleared_by_the_next_pass(llama):
    with Sieve("full", sequence="fastv(layer=0, keep=0.5)").attach(llama) as cache, torch.no_grad():
        llama(prompt_ids(20), past_key_values=cache)
        assert cache.pass_state[PASS].rows.shape[1] == 10
        llama(prompt_ids(1), past_key_values=cache)
        assert not cache.pass_state[PASS].active


def test_bench_query_aware_rows_never_prune_the_question(tmp_path):
    """The bench marks only the context prunable: at keep 0.1 the pruned layer holds every question token, the last
    token and a tenth of the context (``context_tokens`` counts context and question)."""
    from bench_tiny import tiny_model
    from kvsieve.bench.runner import BenchConfig, Runner
    from kvsieve.bench.units import Conversation
    from kvsieve.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_model(len(tokenizer))
    config = BenchConfig(tasks=["passkey"], methods=["full"], lengths=[512], samples=1, mode="aware",
                         sequences=["fastv(layer=0, keep=0.1)"], out=str(tmp_path))  # fmt: skip
    runner = Runner(config, model, tokenizer)
    unit = runner.plan()[0]
    context, question = Conversation(tokenizer, unit.sample).first_turn(0)
    (row,) = runner.run()
    n, n_context = context.shape[1] + question.shape[1], context.shape[1]
    assert row["context_tokens"] == n
    pruned_layer = 2 * row["kv_tokens"] - n  # kv_tokens: the mean of layer 0 (every token) and layer 1
    assert pruned_layer == question.shape[1] + int(n_context * 0.1)
