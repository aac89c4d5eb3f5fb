"""Every registered method, automatically: a new method file is tested here without editing any list.

For each cache method in ``list_methods("cache")`` (and compositions of the wrappers around an evicting method):
compression 0 equals transformers bitwise; a token budget holds at every step; a ratio compresses the prompt then
appends; a chunked prefill stays within budget + chunk; a periodic budget holds at most budget + interval - 1; the
shared-prefill replay equals the method's own run (every shareable method, beyond the replay's kept-query window);
same inputs give the same outputs; a left-padded batch gives each row what it gets alone (or is refused before
running). ``ARGS`` only says what a method needs to run on the tiny test models.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, build, list_methods
from kvsieve.methods.base import LayerContext, Wrapper, batch_rule, overrides
from kvsieve.reconstruction import post_prefill_method
from kvsieve.snapshot import KEPT_QUERIES, PrefillSnapshot, shareable
from tiny_models import make_model, prompt_ids

PROFILE = "{profile}"  # replaced by the path of a head profile of the tiny model (fixture below)
# hyperparameters that fit the tiny models (2 layers, 2 KV heads, short prompts); every other method runs by name
ARGS = {
    "adakv": "adakv:snapkv(window=4)",
    "duoattention": f"duoattention(profile={PROFILE!r})",
    "razorattention": f"razorattention(profile={PROFILE!r}, n_sink=2)",
    "quest": "quest(page_size=4, dense_layers=0)",
    "tokenselect": "tokenselect(n_init=2, n_local=4)",
    "tidaldecode": "tidaldecode(dense_layers=0, reselect_layer=-1)",
    "recycled_attention": "recycled_attention(stride=3)",
    "kivi": "kivi(group=4, residual=4)",
    "zipcache": "zipcache(block=8)",
    "minicache": "minicache(start=0)",
    "compresskv": "compresskv(min_tokens=4)",
    "kvzip": "kvzip(layerwise=True)",  # per-layer budgets as checked here (the global mode: test_kvpress_scorers)
    "kvzip_plus": "kvzip_plus(layerwise=True)",
    "leverage_score": "leverage_score(sketch=16)",  # exact leverage on 16-dim heads (smaller sketches leave near-ties)
    # kvpress wrappers and policies (H12b): inner scorers sized for the tiny models
    "critical_adakv": "critical_adakv:snapkv(window=4)",
    "lukv": "lukv(shares=((1.5, 0.5), (1.0, 1.0))):snapkv(window=4)",
    "per_layer": "per_layer(ratios=(0.2, 0.6)):snapkv(window=4)",
    "compose": "compose(methods=('snapkv(window=4)', 'knorm'))",
    "rerotate": "rerotate:snapkv(window=4)",
    "chunkkv": "chunkkv(chunk_length=4):snapkv(window=4)",
    "entropy_chunkkv": "entropy_chunkkv(chunk_length=4, spiky_keep=2):snapkv(window=4)",
    "simlayerkv": "simlayerkv(threshold=0.0, n_initial=2)",  # every layer lazy: sinks + recent under the budget
    "finch": "finch(window=4)",  # a fixed window: the matrix prefills context and question in one pass
    "dms": "dms(threshold=-1e9, window=64):snapkv(window=4)",  # no threshold eviction: the budget cap alone
    "merging": "merging:snapkv(window=4)",
    "cam": "cam(merge_budget=4):snapkv(window=4)",
    # H12c: per-layer budgets as checked here (the global allocations: tests/test_remaining_methods.py)
    "kvgrad": "kvgrad(layerwise=True)",
    "kvcompose": "kvcompose(layerwise=True)",
    "taskkv": "taskkv(ratio=0.5, n_sink=2)",  # one of the tiny models' two KV heads keeps everything
    "actqkv": "actqkv(n_init=2, n_local=2)",
}
WHOLE_HEADS = ("duoattention", "razorattention", "taskkv")  # some of their heads keep every token by design
# keep-all methods whose neutral setting must leave attention untouched (the others change storage by design)
NEUTRAL = {"full": "full", "zerotuning": "zerotuning(gamma=1.0)", "act": "act(beta=1.0)"}
INNER = "snapkv(window=4)"


def _spec(cls) -> str:
    return ARGS.get(cls.name, cls.name)


def _compositions() -> list[str]:
    """Each wrapper that adds no policy of its own (storage, calibration, reads), around an evicting method."""
    out = []
    for cls in list_methods("cache"):
        if issubclass(cls, Wrapper) and cls.own_kind != "evict" and cls.name != "minicache":
            spec = _spec(cls)
            if cls.own_kind == "read":
                spec = spec.replace(")", ", read_budget=8)") if "(" in spec else f"{spec}(read_budget=8)"
            out.append(f"{spec}:{INNER}")
    return [
        *out, "minicache(start=0):streaming_llm(rerotate=False)", "pyramidkv:adakv:snapkv(window=4)",
        "compose(methods=('snapkv(window=4)', 'knorm', 'think'))", "think:adakv:snapkv(window=4)",
        "rerotate:chunkkv(chunk_length=4):snapkv(window=4)", "merging:adakv:snapkv(window=4)",
    ]  # fmt: skip


CACHE = [_spec(c) for c in list_methods("cache")] + _compositions()


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory) -> str:
    from kvsieve.diagnose.profile import HeadProfile

    prof = HeadProfile(model="tiny", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       retrieval=[[0.0, 0.0, 0.0, 0.8], [0.0, 0.1, 0.0, 0.0]])  # fmt: skip
    return str(prof.save(tmp_path_factory.mktemp("profile") / "tiny.json"))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model("llama")


def method_of(spec: str, profile: str):
    return build(spec.replace(PROFILE, profile))


def run(model, cache, ids, steps=4, chunk=None, mask=None, watch=None):
    """Prefill (optionally chunked) then greedy decoding; returns each pass's last logits ``(B, vocab)``."""
    out = []
    n = ids.shape[1]
    step = n if chunk is None else chunk
    with torch.no_grad():
        session = getattr(cache, "session", None)
        post = post_prefill_method(session.method) if session is not None else None
        # kvzip: the prompt goes in without eviction, then its repeat passes score and compress (as kvsieve.prefill)
        paused = cache.paused() if post is not None else contextlib.nullcontext()
        with paused:
            for start in range(0, n, step):
                kwargs = {}
                if mask is not None:
                    kwargs = dict(
                        attention_mask=mask[:, : start + step], position_ids=_positions(mask)[:, start : start + step]
                    )
                out.append(model(ids[:, start : start + step], past_key_values=cache, **kwargs).logits[:, -1])
                if watch and post is None:
                    watch(cache)
        if post is not None:
            post.after_prefill(model, cache, ids, CharTokenizer())
            if watch:
                watch(cache)
        for _ in range(steps):
            nxt = out[-1].argmax(-1, keepdim=True)
            kwargs = {}
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                kwargs = dict(attention_mask=mask, position_ids=_positions(mask)[:, -1:])
            out.append(model(nxt, past_key_values=cache, **kwargs).logits[:, -1])
            if watch:
                watch(cache)
    return out


class CharTokenizer:
    """One id per character: the repeat prompts of kvzip on the tiny models, which have no tokenizer."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [3 + ord(c) % 90 for c in text]})()


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def budget_args(spec: str, profile: str, **evict) -> dict:
    """What a Sieve of this method takes: the eviction budget for evicting kinds, a read budget for read-only ones."""
    method = method_of(spec, profile)
    if method.kind == "keep-all":
        return {}
    if method.kind == "read":
        return {"budget": 8}
    return {**evict, "interval": 1} if "budget" in evict else evict  # every decoding step evicts


def expected_per_layer(method, budget: int, idx: int, seen: int, n_new: int) -> int:
    return method.layer_budget(budget, LayerContext(idx, 2, seen, n_new))


def held(cache) -> list[list[int]]:
    return [layer.tokens_per_head() for layer in cache.sieve_layers()]


# --- exactness ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", CACHE)
def test_at_zero_compression_every_method_is_transformers_bitwise(model, profile_path, spec):
    method = method_of(spec, profile_path)
    if method.kind == "keep-all":
        name = spec.split("(")[0].split(":")[0]
        if name not in NEUTRAL or ":" in spec:
            pytest.skip("keeps every token but changes storage or attention by design (no 0% setting)")
        method = build(NEUTRAL[name])
        sieve = Sieve(method)
    elif overrides(method, "pack") or overrides(method, "logit_bias"):
        pytest.skip("quantises, merges or calibrates what it keeps: the inner method is tested at 0% on its own")
    elif method.kind == "read":
        sieve = Sieve(method, budget=100)  # a read budget covering the whole context
    else:  # (a composed read method reads within the whole context too)
        sieve = Sieve(method_of(spec.replace("read_budget=8", "read_budget=100"), profile_path), compression=0.0)
    ids = prompt_ids(40)
    ref = run(model, DynamicCache(config=model.config), ids)
    with sieve.attach(model) as cache:
        got = run(model, cache, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


# --- budgets --------------------------------------------------------------------------------------------------------
def _check_holds(method, cache, budget: int, seen: int, n_new: int, slack: int = 0) -> None:
    for idx, per_head in enumerate(held(cache)):
        want = expected_per_layer(method, budget, idx, seen, n_new)
        if method.name in WHOLE_HEADS:
            assert min(per_head) <= want + slack
        elif len(set(per_head)) > 1 or overrides(method, "select"):  # head-wise: the layer's budget, shared
            assert want * len(per_head) <= sum(per_head) <= (want + slack) * len(per_head)
        else:
            assert all(want <= n <= want + slack for n in per_head), (per_head, want)


@pytest.mark.parametrize("spec", CACHE)
def test_a_token_budget_holds_after_every_pass(model, profile_path, spec):
    method = method_of(spec, profile_path)
    if not method.evicts:
        pytest.skip("keeps every token")
    budget, ids = 12, prompt_ids(40)
    seen = []

    def watch(cache):
        seen.append(cache.sieve_layers()[0].seen)
        _check_holds(method, cache, budget, seen[-1], 40 if len(seen) == 1 else 1)

    with Sieve(method, budget=budget, interval=1).attach(model) as cache:
        run(model, cache, ids, steps=5, watch=watch)
    assert len(seen) == 6


@pytest.mark.parametrize("spec", CACHE)
def test_a_ratio_compresses_the_prompt_then_decoding_appends(model, profile_path, spec):
    method = method_of(spec, profile_path)
    if not method.evicts:
        pytest.skip("keeps every token")
    passes = []
    with Sieve(method, compression=0.5).attach(model) as cache:
        run(model, cache, prompt_ids(40), steps=3, watch=lambda c: passes.append(held(c)))
    after_prompt = passes[0]
    _check_holds(method, _Held(after_prompt), 20, 40, 40)
    for step, state in enumerate(passes[1:], start=1):
        assert state == [[n + step for n in layer] for layer in after_prompt]


class _Held:
    def __init__(self, per_layer):
        self.per_layer = per_layer

    def sieve_layers(self):
        return [type("L", (), {"tokens_per_head": lambda s, p=p: p})() for p in self.per_layer]


@pytest.mark.parametrize("spec", CACHE)
def test_a_chunked_prefill_holds_budget_plus_chunk_at_most(model, profile_path, spec):
    method = method_of(spec, profile_path)
    if not method.evicts:
        pytest.skip("keeps every token")
    budget, chunk = 12, 10
    peaks = []
    from kvsieve.cache import SieveLayer

    original = SieveLayer.commit

    def spy(self, *a, **k):
        original(self, *a, **k)
        peaks.append(self.held)

    SieveLayer.commit = spy
    try:
        with Sieve(method, budget=budget).attach(model) as cache:
            run(model, cache, prompt_ids(45), steps=0, chunk=chunk)
    finally:
        SieveLayer.commit = original
    if method.name not in WHOLE_HEADS and post_prefill_method(method) is None:
        assert max(peaks) <= 2 * budget + chunk  # head-wise budgets may give one head up to the layer's share
    _check_holds(method, cache, budget, 45, 5)


@pytest.mark.parametrize("interval", [3, 6])
@pytest.mark.parametrize("spec", CACHE)
def test_a_periodic_budget_holds_at_most_budget_plus_interval_minus_one(model, profile_path, spec, interval):
    method = method_of(spec, profile_path)
    if not method.evicts:
        pytest.skip("keeps every token")
    budget, history = 12, []

    def watch(cache):  # (tokens per head, this layer's budget) per layer
        seen = cache.sieve_layers()[0].seen
        history.append([(p, expected_per_layer(method, budget, i, seen, 1)) for i, p in enumerate(held(cache))])

    with Sieve(method, budget=budget, interval=interval).attach(model) as cache:
        run(model, cache, prompt_ids(30), steps=12, watch=watch)
    for state in history[1:]:
        for per_head, want in state:
            if method.name in WHOLE_HEADS:
                assert min(per_head) <= want + interval - 1
            else:
                assert sum(per_head) <= (want + interval - 1) * len(per_head)
    assert any(sum(p) > w * len(p) for s in history[1:] for p, w in s)  # it does hold more between evictions


# --- the shared prefill ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [{"compression": 0.5}, {"budget": 24}])
@pytest.mark.parametrize("spec", CACHE)
def test_the_shared_prefill_replay_equals_the_methods_own_run(model, profile_path, spec, budget):
    method = method_of(spec, profile_path)
    if not shareable(method):
        pytest.skip("biases attention during the prefill: the bench prefills it on its own")
    ids = prompt_ids(KEPT_QUERIES + 36)  # beyond the queries the snapshot keeps
    snap = PrefillSnapshot(model, ids, [method])
    follow = prompt_ids(3, seed=9)
    kwargs = budget_args(spec, profile_path, **budget)
    sieve = Sieve(method, **kwargs)
    with sieve.attach(model) as alone, torch.no_grad():
        model(ids, past_key_values=alone)
        shared = snap.compress(method, sieve.budget if method.evicts else None)
        assert shared.kv_tokens() == alone.kv_tokens()
        for a, b in zip(alone.sieve_layers(), shared.sieve_layers(), strict=True):
            for sa, sb in zip(a.segments, b.segments, strict=True):
                assert type(sa) is type(sb)
                assert torch.equal(sa.positions, sb.positions)
                ka, va = sa.read()
                kb, vb = sb.read()
                assert torch.equal(ka, kb) and torch.equal(va, vb)
                assert sa.state.keys() == sb.state.keys()
                assert all(torch.equal(sa.state[k], sb.state[k]) for k in sa.state)
        with alone.paused(), shared.paused():
            la = model(follow, past_key_values=alone).logits
            lb = model(follow, past_key_values=shared).logits
        assert torch.equal(la, lb)
        # decoding on (eviction resumed where the budget asks for it) stays identical
        for _ in range(3):
            nxt = la[:, -1:].argmax(-1)
            la, lb = model(nxt, past_key_values=alone).logits, model(nxt, past_key_values=shared).logits
            assert torch.equal(la, lb)


# --- determinism and batches ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", CACHE)
def test_same_inputs_same_outputs(model, profile_path, spec):
    method = method_of(spec, profile_path)
    kwargs = budget_args(spec, profile_path, budget=12)

    def once():
        with Sieve(method_of(spec, profile_path), **kwargs).attach(model) as cache:
            logits = run(model, cache, prompt_ids(40), steps=4)
        return logits, [s.read() for layer in cache.sieve_layers() for s in layer.segments]

    (la, sa), (lb, sb) = once(), once()
    assert all(torch.equal(a, b) for a, b in zip(la, lb, strict=True))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(sa, sb, strict=True))
    assert method.spec() == build(method.spec()).spec()


@pytest.mark.parametrize("spec", CACHE)
def test_packed_decoding_equals_attention_over_repeated_heads(model, profile_path, spec, monkeypatch):
    """Decoding reads (selective reads, per-head segments) take the packed route (``attention.decode_packed``); with
    the route it replaced (``sdpa_output`` unpacked) in its place every pass's logits agree, over a 300-token prompt."""
    from kvsieve import attention

    kwargs = budget_args(spec, profile_path, budget=96)
    kwargs.pop("interval", None)  # the default period: decoding steps between evictions attend without statistics
    ids = prompt_ids(300)
    calls = []

    class Module(torch.nn.Module):  # what sdpa_output reads of an attention module
        is_causal = True

    def repeated_heads(query, keys, values, allowed, scaling, bias=None):  # the route packing replaced
        calls.append(keys.shape[2])
        module = Module()
        module.num_key_value_groups = query.shape[1] // keys.shape[1]
        return attention.sdpa_output(module, query, keys, values, allowed, scaling, bias=bias)

    with Sieve(method_of(spec, profile_path), **kwargs).attach(model) as cache:
        fast = run(model, cache, ids, steps=6)
    monkeypatch.setattr(attention, "decode_packed", repeated_heads)
    with Sieve(method_of(spec, profile_path), **kwargs).attach(model) as cache:
        reference = run(model, cache, ids, steps=6)
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    method = method_of(spec, profile_path)
    if method.kind == "read":
        assert calls and min(calls) < ids.shape[1]  # the packed route did read selectively
    if spec.startswith("adakv") and any(len(layer.segments) > 1 for layer in cache.sieve_layers()):
        assert calls  # layers split per head decoded through the packed route between evictions


@pytest.mark.parametrize("budget", [{"compression": 0.5}, {"budget": 12}])
@pytest.mark.parametrize("spec", CACHE)
def test_a_padded_batch_gives_each_row_what_it_gets_alone(model, profile_path, spec, budget):
    method = method_of(spec, profile_path)
    kwargs = budget_args(spec, profile_path, **budget)
    long, short = prompt_ids(40, seed=1), prompt_ids(25, seed=2)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 15, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    rule = batch_rule(method)
    if rule != "any":
        with Sieve(method, **kwargs).attach(model) as cache, pytest.raises(KVSieveError, match=rule_error[rule]):
            run(model, cache, ids, steps=0, mask=mask)
        assert cache.kv_tokens() == [0, 0]  # refused before any layer ran
        return
    with Sieve(method, **kwargs).attach(model) as cache:
        batched = run(model, cache, ids, steps=3, mask=mask)
        rows = [[_real_positions(layer, b) for layer in cache.sieve_layers()] for b in range(2)]
    for b, prompt in enumerate([long, short]):
        with Sieve(method_of(spec, profile_path), **kwargs).attach(model) as cache:
            alone = run(model, cache, prompt, steps=3)
            assert rows[b] == [_real_positions(layer, 0) for layer in cache.sieve_layers()]
        for x, y in zip(batched, alone, strict=True):
            assert torch.equal(x[b].argmax(), y[0].argmax())
            torch.testing.assert_close(x[b], y[0], rtol=1e-4, atol=1e-4)


rule_error = {"single": "batch size 1", "unpadded": "left-padded row"}


def _real_positions(layer, b: int) -> list[list[int]]:
    """Sorted positions of the real tokens each KV head of ``layer`` holds for batch row ``b``."""
    out = []
    for seg in layer.segments:
        valid = seg.valid
        for h in range(seg.n_heads):
            pos = seg.positions[b, h]
            if valid is not None:
                pos = pos[valid[b, h]]
            out.append(sorted(pos.tolist()))
    return out
