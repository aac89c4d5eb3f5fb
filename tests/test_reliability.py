"""Misuse of the Python API: every defect found by trying to break the core has a regression test here, and a
property-based test checks that any input either works or raises a KVSieveError with a message."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kvsieve
from kvsieve import BudgetError, KVSieveError, Sieve, UnknownMethodError, build, list_methods
from tiny_models import make_model, prompt_ids

MODEL = make_model("llama")


def test_a_cache_used_after_its_block_raises_on_the_first_call():
    ids = prompt_ids(12)
    with Sieve("snapkv", compression=0.5).attach(MODEL) as cache, torch.no_grad():
        MODEL(ids, past_key_values=cache)
    with torch.no_grad(), pytest.raises(KVSieveError, match="block that has ended"):
        MODEL(ids[:, :1], past_key_values=cache)  # before: silently ran without the cache


def test_an_outer_cache_inside_a_nested_block_is_refused():
    ids = prompt_ids(12)
    with Sieve("full").attach(MODEL) as outer, torch.no_grad():
        with Sieve("snapkv", compression=0.5).attach(MODEL), pytest.raises(KVSieveError, match="another"):
            MODEL(ids, past_key_values=outer)  # before: compressed by the inner sieve's method
        MODEL(ids, past_key_values=outer)  # the outer block still works once the inner one is left
    assert outer.kv_tokens() == [12, 12]


def _padded(long, short):
    ids = torch.cat([long, torch.cat([torch.zeros(1, long.shape[1] - short.shape[1], dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, : long.shape[1] - short.shape[1]] = 0
    return ids, mask


@pytest.mark.parametrize("spec,budget", [("streaming_llm", {"budget": 40}), ("snapkv", {"compression": 0.5})])
def test_a_padded_generate_gives_each_row_what_it_gives_alone(spec, budget):
    long, short = prompt_ids(200, seed=4), prompt_ids(60, seed=5)
    ids, mask = _padded(long, short)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with Sieve(spec, **budget).attach(MODEL) as cache:
        both = MODEL.generate(ids, attention_mask=mask, past_key_values=cache, **kwargs)
        real = [int(s.valid[1, 0].sum()) if s.valid is not None else s.length for s in cache.layers[0].segments]
    for row, prompt in enumerate([long, short]):
        with Sieve(spec, **budget).attach(MODEL) as cache:
            alone = MODEL.generate(prompt, past_key_values=cache, **kwargs)
        assert torch.equal(both[row, -6:], alone[0, -6:])
        if row == 1 and "compression" in budget:  # the 60-token row keeps 30 real tokens + 5 decoded, as alone
            assert real == [35] and cache.kv_tokens()[0] == 35


@pytest.mark.parametrize(
    "spec,match",
    [
        ("random(seed='x')", "random: seed must be an int"),
        ("snapkv(window=-3)", "snapkv: window must be >= 1"),
        ("snapkv(window='a')", "snapkv: window must be an int"),
        ("snapkv(window=1.5)", "snapkv: window must be an int"),
        ("adakv:adakv:snapkv", "both decide which tokens each head keeps"),
        ("pyramidkv:pyramidkv", "both decide the layer budgets"),
        ("adakv:full", "full keeps every token"),
        ("h2o(recent=2.0)", "h2o: recent must be < 1"),
        ("a2sf(forgetting=-1)", "a2sf: forgetting must be > 0"),
        ("snapkv:quest", "snapkv does not wrap another method"),
        ("snapkvv", "did you mean snapkv"),
        ("snapkv(windw=16)", "its fields: window, kernel, pooling"),
        ("", "non-empty"),
    ],
)
def test_bad_specs_are_one_clear_error(spec, match):
    with pytest.raises(KVSieveError, match=match):
        build(spec)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: Sieve("snapkv", compression="0.5"), "compression must be a number"),
        (lambda: Sieve("snapkv", budget=float("nan")), "budget must be a number"),
        (lambda: Sieve("snapkv", budget=3.5), "whole number"),
        (lambda: Sieve(None), "needs a cache method"),
        (lambda: Sieve("snapkv", budget=10, interval=0), "interval must be"),
        (lambda: Sieve("snapkv", compression=0.5, interval=4), "interval applies to a token budget"),
        (lambda: Sieve("quest(read_budget=32)", budget=32), "give the read budget once"),
    ],
)
def test_bad_budgets_are_one_clear_error(call, match):
    with pytest.raises(BudgetError if "budget" in match or "number" in match else KVSieveError, match=match):
        call()


def test_generate_refuses_a_prompt_that_is_not_text_or_ids():
    with pytest.raises(KVSieveError, match="prompt must be a string or a tensor"):
        kvsieve.generate(MODEL, None, 12345, Sieve("full"))
    with pytest.raises(KVSieveError, match="max_new_tokens"):
        kvsieve.generate(MODEL, None, prompt_ids(5), Sieve("full"), max_new_tokens=-1)
    with pytest.raises(KVSieveError, match="empty"):
        kvsieve.generate(MODEL, None, "   ", Sieve("full"))


# --- property-based: anything either works or is a KVSieveError ----------------------------------------------------
NAMES = sorted({c.name for c in list_methods("cache")})
PLAUSIBLE = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 0.1, 0.5, 0.9, 1.0, True, "avg", "all"])
GARBAGE = st.one_of(
    st.integers(-3, 80), st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=3),
    st.booleans(), st.none(), st.just((0.5, 0.5)),
)  # fmt: skip
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, GARBAGE)  # mostly values a user might try, some that make no sense


@st.composite
def specs(draw) -> str:
    parts = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3]))):
        name = draw(st.sampled_from(NAMES))
        cls = kvsieve.methods.registry()[name]
        names = [f for f in cls.__dataclass_fields__ if f not in ("inner", "profile")]
        chosen = draw(st.lists(st.sampled_from(names), max_size=1, unique=True)) if names else []
        args = ", ".join(f"{k}={draw(VALUES)!r}" for k in chosen)
        parts.append(f"{name}({args})" if args else name)
    return ":".join(parts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    spec=specs(),
    budget=st.one_of(
        st.integers(4, 60), st.integers(4, 60), st.none(), st.integers(-2, 3), st.floats(width=32), st.just("8")
    ),
    ratio=st.one_of(st.none(), st.none(), st.none(), st.floats(-0.5, 1.5, width=32)),
    axes=st.sampled_from([{}, {"prefill": "oracle_topk(block_size=4, density=0.5)"}, {"sequence": "fastv(layer=0)"}]),
    n=st.integers(1, 40),
)
def test_any_input_works_or_is_a_kvsieve_error(spec, budget, ratio, axes, n):
    try:
        sieve = Sieve(spec, budget=budget, compression=ratio, **axes)
        with sieve.attach(MODEL) as cache, torch.no_grad():
            logits = MODEL(prompt_ids(n), past_key_values=cache).logits
            for _ in range(2):
                logits = MODEL(logits[:, -1:].argmax(-1), past_key_values=cache).logits
    except KVSieveError as err:
        assert str(err) and "\n" not in str(err).strip(), f"one line: {err}"
        event(f"refused: {type(err).__name__}")
        return
    event("ran")
    assert torch.isfinite(logits).all()
    if sieve.budget.tokens is not None and sieve.method.kind == "evict" and n + 2 > sieve.budget.tokens:
        for per_head, layer in zip(cache.kv_tokens(), cache.sieve_layers(), strict=True):
            per = per_head if isinstance(per_head, list) else [per_head]
            slack = sieve.budget.every - 1  # a periodic budget evicts every `interval` decoding steps
            assert min(per) <= sieve.method.layer_budget(sieve.budget.tokens, _ctx(layer)) + slack


def _ctx(layer):
    from kvsieve.methods.base import LayerContext

    return LayerContext(0, 2, layer.seen, 1)


def test_unknown_method_error_is_a_key_and_value_error():
    with pytest.raises(UnknownMethodError):
        build("nope")
