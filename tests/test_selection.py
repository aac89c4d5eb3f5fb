"""Selective reads at decode time: TokenSelect, Quest, TidalDecode, Recycled Attention.

Exactness against full attention on tiny models, each method's selection rule on hand-built keys and queries, the
Selection Cache's reuse rule, and composition with eviction.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsieve import Sieve, attention
from kvsieve.errors import BudgetError, KVSieveError
from kvsieve.methods import build
from kvsieve.methods.base import Observation
from kvsieve.methods.families import remap_by_position
from kvsieve.methods.quest import page_bounds, page_scores
from kvsieve.methods.tidaldecode import group_attention
from tiny_models import make_model, prompt_ids

# every layer of the 2-layer tiny models selects (the defaults keep the first layers dense, as the papers do)
SELECTIVE = [
    "tokenselect(n_init=2, n_local=4)",
    "quest(dense_layers=0, page_size=4)",
    "tidaldecode(dense_layers=0, reselect_layer=-1)",
    "recycled_attention(stride=3)",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP hand-offs, which dominate on a small, shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_steps(model, cache, ids: torch.Tensor, steps: int = 6) -> list[torch.Tensor]:
    """Prefill then greedy-decode ``steps`` tokens; the logits of each forward pass."""
    out = []
    with torch.no_grad():
        out.append(model(ids, past_key_values=cache, use_cache=True).logits)
        for _ in range(steps):
            nxt = out[-1][:, -1:].argmax(-1)
            out.append(model(nxt, past_key_values=cache, use_cache=True).logits)
    return out


class ReadLengths:
    """Records how many tokens each decoding-step attention call reads (keys reaching sdpa), with its decoding step
    and layer: ``calls`` holds ``(step, layer, tokens)``; ``lengths`` the tokens alone."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []

    @property
    def lengths(self) -> list[int]:
        return [n for _, _, n in self.calls]

    def __enter__(self):
        self.original = attention.sdpa_output

        def spy(module, query, keys, *args, **kwargs):
            if query.shape[2] == 1:
                step = self.calls[-1][0] if self.calls else -1
                if not self.calls or module.layer_idx < self.calls[-1][1]:
                    step += 1
                self.calls.append((step, module.layer_idx, keys.shape[2]))
            return self.original(module, query, keys, *args, **kwargs)

        attention.sdpa_output = spy
        return self

    def __exit__(self, *exc):
        attention.sdpa_output = self.original


def sparse_reads(spec: str, reads: ReadLengths) -> list[int]:
    """The reads of the steps and layers that select: TidalDecode's selection layer 0 and Recycled Attention's full
    steps (every ``stride``-th) attend to every token by design."""
    if spec.startswith("tidaldecode"):
        return [n for _, layer, n in reads.calls if layer != 0]
    if spec.startswith("recycled_attention"):
        stride = int(spec.split("stride=")[1].split(")")[0].split(",")[0])
        return [n for step, _, n in reads.calls if step % stride]
    return reads.lengths


# --- exactness ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SELECTIVE)
def test_budget_covering_the_context_is_exactly_full_attention(arch_model, spec):
    ids = prompt_ids(40)
    ref = run_steps(arch_model, DynamicCache(config=arch_model.config), ids)
    with Sieve(spec, budget=46).attach(arch_model) as cache:  # 40 prompt + 6 decoded tokens
        got = run_steps(arch_model, cache, ids)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    # the same method under a small budget does read fewer tokens and changes the logits (the test can fail)
    with Sieve(spec, budget=12).attach(arch_model) as cache, ReadLengths() as reads:
        small = run_steps(arch_model, cache, ids)
    assert min(reads.lengths) <= 12 and max(reads.lengths) <= 46
    assert not all(torch.equal(a, b) for a, b in zip(ref[1:], small[1:], strict=True))


@pytest.mark.parametrize("spec", SELECTIVE)
def test_fraction_read_budget_and_padding(llama, spec):
    ids = prompt_ids(30, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    plain = llama.generate(ids, **kwargs)
    if spec.startswith("quest"):  # pages are slot groups, which left padding would shift: refused up front
        with Sieve(spec, compression=0.5).attach(llama) as cache, pytest.raises(KVSieveError, match="left-padded"):
            llama.generate(ids, past_key_values=cache, **kwargs)
        return
    with Sieve(spec, compression=0.0).attach(llama) as cache:  # reads int(T * 1.0) = every token
        assert torch.equal(plain, llama.generate(ids, past_key_values=cache, **kwargs))
    with Sieve(spec, compression=0.5).attach(llama) as cache, ReadLengths() as reads:
        out = llama.generate(ids, past_key_values=cache, **kwargs)
    assert out.shape == (2, 35)
    assert max(sparse_reads(spec, reads)) <= 17  # half of at most 34 held tokens (Quest: whole pages)


@pytest.mark.parametrize("spec", SELECTIVE)
def test_same_seed_same_outputs(llama, spec):
    ids = prompt_ids(40)
    runs = []
    for _ in range(2):
        with Sieve(spec, budget=12).attach(llama) as cache:
            runs.append(run_steps(llama, cache, ids))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_the_whole_cache_is_kept(llama):
    ids = prompt_ids(40)
    with Sieve("quest(dense_layers=0, page_size=4)", budget=8).attach(llama) as cache:
        run_steps(llama, cache, ids, steps=4)
    assert cache.kv_tokens() == [44, 44]


# --- Quest ------------------------------------------------------------------------------------------------------------
def obs_for(keys: torch.Tensor, queries: torch.Tensor, budget: int, layer_idx: int = 0, n_layers: int = 4, **kw):
    b, h, t, d = keys.shape
    return Observation(
        layer_idx=layer_idx,
        n_layers=n_layers,
        keys=keys,
        values=torch.zeros_like(keys),
        queries=queries,
        positions=torch.arange(t).expand(b, h, t).clone(),
        valid=None,
        attention=None,
        state={},
        n_new=1,
        scaling=d**-0.5,
        budget=t,
        read_budget=budget,
        **kw,
    )


def test_quest_page_min_max_includes_the_partial_last_page():
    keys = torch.randn(2, 3, 37, 8)
    mins, maxs = page_bounds(keys, 16)
    assert mins.shape == (2, 3, 3, 8)
    for p, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 37)]):
        assert torch.equal(mins[:, :, p], keys[:, :, lo:hi].amin(2))
        assert torch.equal(maxs[:, :, p], keys[:, :, lo:hi].amax(2))


def test_quest_bound_is_an_upper_bound_on_every_page_maximum():
    torch.manual_seed(0)
    b, h, g, t, d, page = 2, 3, 3, 100, 16, 16
    keys = torch.randn(b, h, t, d, dtype=torch.float64) * torch.rand(1, 1, t, 1, dtype=torch.float64) * 3
    queries = torch.randn(b, h * g, d, dtype=torch.float64)
    mins, maxs = page_bounds(keys, page)
    bound = page_scores(queries, mins, maxs)  # (B, h, g, P)
    true = queries.view(b, h, g, 1, d) @ keys[:, :, None].transpose(-1, -2)  # (B, h, g, 1, T)
    true = torch.nn.functional.pad(true[..., 0, :], (0, 7 * page - t), value=float("-inf"))
    page_max = true.view(b, h, g, 7, page).amax(-1)
    assert (bound >= page_max - 1e-9).all()
    # and it is tight for pages of one token (min = max = the key)
    one = page_scores(queries, keys, keys)
    torch.testing.assert_close(one, true[..., :t])


def test_quest_reads_the_pages_with_the_highest_bounds_and_the_last_page():
    b, h, t, d = 1, 2, 70, 4
    keys = torch.zeros(b, h, t, d)
    keys[0, 0, 20, 0] = 5.0  # head 0: page 1 (tokens 16..31) has a key along the query
    keys[0, 0, 40, 1] = -3.0  # head 0: page 2 has one against the query's second axis (negative query there)
    keys[0, 1, 5, 0] = 5.0  # head 1: page 0
    queries = torch.zeros(b, h * 2, 1, d)
    queries[..., 0] = 1.0
    queries[..., 1] = -1.0
    method = build("quest(page_size=16, dense_layers=1)")
    assert method.reads(obs_for(keys, queries, budget=48, layer_idx=0)) is None  # a dense layer
    picked = method.reads(obs_for(keys, queries, budget=48, layer_idx=1))  # 3 pages: 2 by bound + the last one
    assert picked.shape == (1, 2, 2 * 16 + 6)  # the last page holds tokens 64..69
    head0, head1 = set(picked[0, 0].tolist()), set(picked[0, 1].tolist())
    assert head0 == set(range(16, 48)) | set(range(64, 70))
    assert set(range(0, 16)) <= head1 and set(range(64, 70)) <= head1
    assert method.reads(obs_for(keys, queries, budget=70, layer_idx=1)) is None  # budget covers everything


def test_quest_gqa_page_score_is_the_max_over_the_query_group():
    keys = torch.zeros(1, 1, 48, 2)
    keys[0, 0, 3, 0] = 1.0  # page 0 wins for query head 0
    keys[0, 0, 20, 1] = 2.0  # page 1 wins for query head 1, by more
    queries = torch.zeros(1, 2, 1, 2)
    queries[0, 0, 0, 0] = 1.0
    queries[0, 1, 0, 1] = 1.0
    picked = build("quest(dense_layers=0)").reads(obs_for(keys, queries, budget=32))
    assert set(picked[0, 0].tolist()) == set(range(16, 48))  # page 1 (bound 2) + the last page


def test_quest_pages_grow_incrementally_and_rebuild_after_eviction():
    torch.manual_seed(1)
    method = build("quest(dense_layers=0, page_size=4)")
    keys = torch.randn(1, 2, 9, 4)
    layer_state: dict = {}
    for t in range(9, 20):  # one decoding step at a time
        keys = torch.cat([keys, torch.randn(1, 2, 1, 4)], dim=2)
        obs = obs_for(keys, torch.randn(1, 2, 1, 4), budget=8, layer_state=layer_state)
        bounds = method.bounds(obs)  # maxima, then minima
        maxs, mins = bounds[..., :4], bounds[..., 4:]
        ref_min, ref_max = page_bounds(keys, 4)
        assert torch.equal(mins, ref_min) and torch.equal(maxs, ref_max), t
    state = next(iter(layer_state.values()))
    assert state["rebuilds"] == 1
    evicted = obs_for(keys[:, :, 1:], torch.randn(1, 2, 1, 4), budget=8, layer_state=layer_state)
    evicted.positions = evicted.positions + 1  # token 0 is gone: every index shifted
    mins = method.bounds(evicted)[..., 4:]
    assert torch.equal(mins, page_bounds(keys[:, :, 1:], 4)[0]) and state["rebuilds"] == 2


# --- TokenSelect ------------------------------------------------------------------------------------------------------
def test_tokenselect_soft_vote_is_not_dominated_by_one_head():
    t, d = 40, 4
    keys = torch.zeros(1, 1, t, d)
    keys[0, 0, 10, 0] = 1.0
    keys[0, 0, 20, 1] = 1.0
    queries = torch.zeros(1, 3, 1, d)
    queries[0, 0, 0, 0] = 100.0  # head 0: token 10 with huge logits
    queries[0, 1:, 0, 1] = 10.0  # heads 1 and 2: token 20 with smaller ones
    method = build("tokenselect(n_init=1, n_local=2)")
    picked = method.reads(obs_for(keys, queries, budget=4))
    assert picked[0, 0].tolist() == [0, 38, 39, 20]  # sinks, local window, then the soft vote's winner
    raw_sum = (queries[0, :, 0] @ keys[0, 0].T).sum(0)
    assert raw_sum.argmax() == 10  # a plain sum of logits would have picked head 0's token


def test_tokenselect_matches_the_reference_vote_on_random_tensors():
    torch.manual_seed(2)
    b, h, g, t, d = 2, 3, 2, 64, 8
    keys, queries = torch.randn(b, h, t, d), torch.randn(b, h * g, 1, d)
    for vote in ("layer", "kv_head"):
        method = build(f"tokenselect(n_init=3, n_local=5, vote={vote!r})")
        picked = method.reads(obs_for(keys, queries, budget=20))
        assert picked.shape == (b, h, 20)
        crit = (queries[:, :, 0].view(b, h, g, 1, d) @ keys[:, :, None, 3:59].transpose(-1, -2))[..., 0, :]
        votes = crit.softmax(-1).sum(2)  # (B, h, C)
        if vote == "layer":
            votes = votes.sum(1, keepdim=True).expand(b, h, -1)
        expected = votes.topk(12, dim=-1).indices + 3
        assert torch.equal(picked[..., 8:].sort(-1).values, expected.sort(-1).values)
        assert torch.equal(picked[..., :8], torch.tensor([0, 1, 2, 59, 60, 61, 62, 63]).expand(b, h, 8))


def test_tokenselect_selection_cache_is_reused_only_for_similar_queries():
    torch.manual_seed(3)
    method = build("tokenselect(n_init=1, n_local=2, similarity=0.9)")
    keys = torch.randn(1, 1, 30, 4)
    q1 = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    layer_state: dict = {}
    first = method.reads(obs_for(keys, q1, budget=8, layer_state=layer_state))
    state = next(iter(layer_state.values()))
    assert (state["hits"], state["misses"]) == (0, 1)

    keys2 = torch.cat([keys, torch.randn(1, 1, 1, 4)], dim=2)
    keys2[0, 0, 7] = 50 * torch.tensor([1.0, 0.1, 0.0, 0.0])  # a new favourite the cached selection does not know
    q_close = torch.tensor([1.0, 0.3, 0.0, 0.0]).view(1, 1, 1, 4)  # cosine 0.96 with q1
    again = method.reads(obs_for(keys2, q_close, budget=8, layer_state=layer_state))
    assert (state["hits"], state["misses"]) == (1, 1)
    assert torch.equal(again[..., 3:], first[..., 3:])  # the same selected tokens, reused
    assert again[0, 0, :3].tolist() == [0, 29, 30]  # sinks and the local window follow the new length

    q_far = torch.tensor([0.3, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)  # cosine 0.29 with q1: select anew
    fresh = method.reads(obs_for(keys2, q_far, budget=8, layer_state=layer_state))
    assert (state["hits"], state["misses"]) == (1, 2)
    assert 7 in fresh[0, 0].tolist()


def test_tokenselect_similarity_above_one_disables_the_cache():
    method = build("tokenselect(n_init=1, n_local=2, similarity=1.01)")
    keys, q = torch.randn(1, 1, 30, 4), torch.randn(1, 1, 1, 4)
    layer_state: dict = {}
    for _ in range(3):
        method.reads(obs_for(keys, q, budget=8, layer_state=layer_state))
    assert next(iter(layer_state.values()))["misses"] == 3


# --- TidalDecode ------------------------------------------------------------------------------------------------------
def test_tidaldecode_layers_follow_the_paper():
    method = build("tidaldecode")
    assert method.selection_layers(32) == (2, 13)
    assert method.selection_layers(30) == (2, 12)
    assert build("tidaldecode(reselect_layer=-1)").selection_layers(30) == (2,)


def test_tidaldecode_selection_layers_choose_and_later_layers_reuse():
    torch.manual_seed(4)
    b, h, g, t, d = 1, 2, 2, 50, 8
    keys, queries = torch.randn(b, h, t, d), torch.randn(b, h * g, 1, d)
    method = build("tidaldecode(dense_layers=1, reselect_layer=3)")
    shared: dict = {}

    def at(layer, k=keys, q=queries):
        return method.reads(obs_for(k, q, budget=10, layer_idx=layer, n_layers=5, shared=shared))

    assert at(0) is None  # dense
    assert at(1) is None  # the selection layer attends to everything ...
    expected = group_attention(obs_for(keys, queries, budget=10), t - 1).topk(9, dim=-1).indices
    assert torch.equal(at(2), expected)  # ... and the next layer reads its top 9 (+ the new token)
    probs = (queries.view(b, h, g, 1, d) @ keys[:, :, None].transpose(-1, -2) * d**-0.5).softmax(-1)
    torch.testing.assert_close(group_attention(obs_for(keys, queries, budget=10), t - 1), probs.sum(2)[..., 0, :-1])
    other_q = torch.randn(b, h * g, 1, d)
    assert at(3, q=other_q) is None  # the re-selection layer attends to everything and selects anew
    again = group_attention(obs_for(keys, other_q, budget=10), t - 1).topk(9, dim=-1).indices
    assert torch.equal(at(4), again)


def test_tidaldecode_a_layer_finding_no_selection_of_this_step_selects():
    keys, queries = torch.randn(1, 1, 20, 4), torch.randn(1, 1, 1, 4)
    method = build("tidaldecode(dense_layers=0, reselect_layer=-1)")
    shared: dict = {}
    assert method.reads(obs_for(keys, queries, budget=5, layer_idx=0, shared=shared)) is None
    assert method.reads(obs_for(keys, queries, budget=5, layer_idx=1, shared=shared)).shape == (1, 1, 4)
    # next step: layer 0 is a sliding-window layer kvsieve never sees; layer 1 must not reuse the old selection
    longer = torch.cat([keys, torch.randn(1, 1, 1, 4)], dim=2)
    assert method.reads(obs_for(longer, queries, budget=5, layer_idx=1, shared=shared)) is None
    assert shared["tidaldecode"]["made_at"] == 1
    assert method.reads(obs_for(longer, queries, budget=5, layer_idx=2, shared=shared)).shape == (1, 1, 4)


# --- Recycled Attention -----------------------------------------------------------------------------------------------
def test_recycled_attention_alternates_full_and_recycled_steps():
    torch.manual_seed(5)
    method = build("recycled_attention(stride=3)")
    keys, queries = torch.randn(1, 2, 30, 4), torch.randn(1, 4, 1, 4)
    layer_state: dict = {}
    top = group_attention(obs_for(keys, queries, budget=8), 29).topk(7, dim=-1).indices
    kinds = []
    for step in range(7):
        k = torch.cat([keys, torch.randn(1, 2, step, 4)], dim=2)
        got = method.reads(obs_for(k, torch.randn(1, 4, 1, 4) if step else queries, budget=8, layer_state=layer_state))
        kinds.append("full" if got is None else "partial")
        if step == 1:  # the full step's top 7 minus one for the token decoded since, + tokens 29 (full step's) and 30
            assert torch.equal(got, torch.cat([top[..., :6], torch.tensor([29, 30]).expand(1, 2, 2)], dim=-1))
        if step == 2:
            assert torch.equal(got[..., :5], top[..., :5]) and got[0, 0, 5:].tolist() == [29, 30, 31]
    assert kinds == ["full", "partial", "partial", "full", "partial", "partial", "full"]


def test_recycled_attention_with_stride_one_is_full_attention_at_any_budget(llama):
    ids = prompt_ids(40)
    ref = run_steps(llama, DynamicCache(config=llama.config), ids)
    with Sieve("recycled_attention(stride=1)", budget=8).attach(llama) as cache:
        got = run_steps(llama, cache, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


def test_recycled_attention_query_similarity_triggers_a_refresh():
    method = build("recycled_attention(stride=0, similarity=0.9)")
    keys = torch.randn(1, 1, 30, 4)
    q = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    layer_state: dict = {}
    kinds = []
    for step, query in enumerate([q, q * 2, q + torch.tensor([0, 0.2, 0, 0]), torch.tensor([0, 1.0, 0, 0])]):
        k = torch.cat([keys, torch.randn(1, 1, step, 4)], dim=2)
        kinds.append(method.reads(obs_for(k, query.view(1, 1, 1, 4), budget=8, layer_state=layer_state)) is None)
    assert kinds == [True, False, False, True]
    state = next(iter(layer_state.values()))
    assert (state["full_steps"], state["partial_steps"]) == (2, 2)


def test_recycled_attention_refreshes_early_when_new_tokens_fill_the_budget():
    method = build("recycled_attention(stride=100)")
    q = torch.randn(1, 1, 1, 4)
    layer_state: dict = {}
    full = [
        method.reads(obs_for(torch.randn(1, 1, 30 + s, 4), q, budget=4, layer_state=layer_state)) is None
        for s in range(6)
    ]
    assert full == [True, False, False, True, False, False]  # 4 recent tokens leave no room for recycled ones


# --- composition with eviction ----------------------------------------------------------------------------------
def test_composed_sieve_evicts_with_the_inner_method_and_reads_within():
    sieve = Sieve("quest(read_budget=8, dense_layers=0, page_size=4):snapkv(window=4)", compression=0.5)
    assert sieve.method.evicts and sieve.method.selects and sieve.budget.compression == 0.5
    llama = make_model("llama")
    ids = prompt_ids(40)
    with sieve.attach(llama) as cache, ReadLengths() as reads:
        run_steps(llama, cache, ids, steps=6)
    assert cache.kv_tokens() == [26, 26]  # int(40 * 0.5) after the prompt, then 6 decoded tokens appended
    assert reads.lengths and max(reads.lengths) <= 8


@pytest.mark.parametrize("inner", ["snapkv(window=4)", "h2o", "streaming_llm", "adakv:snapkv(window=4)"])
@pytest.mark.parametrize(
    "outer",
    [
        "quest(page_size=4, dense_layers=0)",
        "tokenselect(n_init=1, n_local=2)",
        "tidaldecode(dense_layers=0, reselect_layer=-1)",
        "recycled_attention(stride=2)",
    ],
)
def test_composed_with_a_read_budget_covering_the_cache_equals_the_eviction_method(llama, outer, inner):
    ids = prompt_ids(40)
    with Sieve(inner, budget=20).attach(llama) as cache:
        ref = run_steps(llama, cache, ids)
    held = cache.kv_bytes()
    name, args = outer.split("(", 1)
    with Sieve(f"{name}(read_budget=10000, {args}:{inner}", budget=20).attach(llama) as cache:
        got = run_steps(llama, cache, ids)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)  # H2O's recent window still sees the eviction budget, not the read budget
    sieve = Sieve(f"{name}(read_budget=8, {args}:{inner}", budget=20)
    picks = []
    original = sieve.method.reads

    def spy(obs):
        index = original(obs)
        picks.append(None if index is None else index.shape[-1])
        return index

    sieve.method.reads = spy
    with sieve.attach(llama) as cache, ReadLengths() as reads:
        small = run_steps(llama, cache, ids)
    assert cache.kv_bytes() == held  # evicted as much as the eviction method alone
    # every selecting call reads at most 8 tokens (the newest included); the others (selection layers, full steps,
    # a layer whose segments were just split per head) attend to the whole held cache
    selecting = [n for n in picks if n is not None]
    assert selecting and max(selecting) <= 8
    assert sum(n <= 8 for n in reads.lengths) == len(selecting)  # and sdpa saw exactly those short reads
    assert not all(torch.equal(a, b) for a, b in zip(ref[1:], small[1:], strict=True))


def test_remap_by_position_finds_kept_tokens_and_fills_evicted_slots_with_recent_ones():
    positions = torch.tensor([[[0, 1, 2, 5, 8, 9, 11, 12]]])
    wanted = torch.tensor([[[5, 3, 9]]])  # 3 was evicted
    forced = positions >= 12
    got = remap_by_position(wanted, positions, None, forced, k=4)
    assert sorted(got[0, 0].tolist()) == [3, 5, 6, 7]  # 12 forced, 5 and 9 kept, then the most recent other (11)


# --- bad input --------------------------------------------------------------------------------------------------
def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(KVSieveError, match="read_budget=256"):
        build("quest:snapkv")
    with pytest.raises(KVSieveError, match="does not evict"):
        build("quest(read_budget=64):full")
    with pytest.raises(KVSieveError, match="does not evict"):
        build("quest(read_budget=64):tokenselect")
    with pytest.raises(BudgetError, match="fraction"):
        build("quest(read_budget=1.5)")
    with pytest.raises(BudgetError, match="positive"):
        build("tidaldecode(read_budget=0)")
    with pytest.raises(BudgetError, match="less than one page"):
        build("quest(read_budget=8)")
    with pytest.raises(BudgetError, match="at least 37"):
        build("tokenselect(read_budget=20)")
    with pytest.raises(KVSieveError, match="similarity"):
        build("recycled_attention(stride=0)")
    with pytest.raises(KVSieveError, match="reselect_layer"):
        build("tidaldecode(reselect_layer=1)")
    llama = make_model("llama")
    with Sieve("quest(dense_layers=0)", budget=8).attach(llama) as cache, pytest.raises(BudgetError, match="page_size"):
        run_steps(llama, cache, prompt_ids(40), steps=1)


@pytest.mark.parametrize("spec", [*SELECTIVE, "quest(read_budget=0.25):snapkv", "tokenselect(read_budget=64):h2o"])
def test_specs_round_trip(spec):
    method = build(spec)
    assert build(method.spec()) == method
