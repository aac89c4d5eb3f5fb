"""Steering methods: ``pine`` (order-invariant over declared segments; dense without them) and ``autopasta``
(PASTA's down-weighting against a naive reference; neutral settings bitwise ``full``; head profiles); and the
multi-document QA task that measures position bias."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, UnsupportedModelError, build
from kvsieve.methods.autopasta import highlight, load_heads, profile_heads
from kvsieve.methods.base import Observation
from kvsieve.methods.pine import set_segments
from kvsieve.models import load_tokenizer
from kvsieve.tasks import get_task
from kvsieve.tasks.multidoc import document_token_spans
from tiny_models import make_model, prompt_ids

SPANS = [(4, 14), (14, 24), (24, 34)]


def _last_logits(model, ids, spans=None, prefill="pine"):
    with Sieve("full", prefill=prefill).attach(model) as cache, torch.no_grad():
        if spans:
            set_segments(cache, model, spans)
        return model(ids, past_key_values=cache).logits[0, -1]


def _swap(ids: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    out[0, 4:14], out[0, 24:34] = ids[0, 24:34], ids[0, 4:14]
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_pine_is_invariant_to_segment_order(arch) -> None:
    model = make_model(arch)
    ids = prompt_ids(40)
    a, b = _last_logits(model, ids, SPANS), _last_logits(model, _swap(ids), SPANS)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = (model(ids).logits[0, -1] - model(_swap(ids)).logits[0, -1]).abs().max()
    assert plain > 1e-3  # the plain model does depend on the order


def test_pine_without_segments_is_bitwise_dense() -> None:
    model = make_model("llama")
    ids = prompt_ids(40)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    with Sieve("full", prefill="pine").attach(model) as cache, torch.no_grad():
        assert torch.equal(model(ids, past_key_values=cache).logits, ref)


def test_pine_segment_queries_see_every_other_segment() -> None:
    """A change in the last segment reaches the first segment's hidden states (bidirectional between segments)."""
    model = make_model("llama")
    ids = prompt_ids(40)
    other = ids.clone()
    other[0, 30] = (ids[0, 30] + 1) % 90 + 3

    def hidden(x):
        with Sieve("full", prefill="pine").attach(model) as cache, torch.no_grad():
            set_segments(cache, model, SPANS)
            return model(x, past_key_values=cache, output_hidden_states=True).hidden_states[-1][0, 4:14]

    assert (hidden(ids) - hidden(other)).abs().max() > 1e-6
    with torch.no_grad():  # plain causal attention: the first segment cannot see later tokens
        h = [model(x, output_hidden_states=True).hidden_states[-1][0, 4:14] for x in (ids, other)]
    assert torch.equal(h[0], h[1])


def test_pine_errors() -> None:
    model = make_model("llama")
    with Sieve("full", prefill="pine").attach(model) as cache:
        for spans, fragment in (
            ([(4, 14)], "at least two"),
            ([(4, 14), (15, 20)], "contiguous"),
            ([(5, 3), (3, 9)], "contiguous"),
        ):
            with pytest.raises(KVSieveError, match=fragment):
                set_segments(cache, model, spans)
        set_segments(cache, model, [(2, 8), (8, 14)])
        with pytest.raises(KVSieveError, match="one prefill pass"), torch.no_grad():
            model(prompt_ids(20), past_key_values=cache)  # a first chunk, then a second one: refused
            model(prompt_ids(20, seed=2), past_key_values=cache)
    gemma = make_model("gemma3")
    with Sieve("full", prefill="pine").attach(gemma) as cache, pytest.raises(UnsupportedModelError, match="sliding"):
        set_segments(cache, gemma, SPANS)


# --- autopasta ----------------------------------------------------------------------------------------------------
def test_autopasta_neutral_settings_are_bitwise_full() -> None:
    model = make_model("llama")
    ids = prompt_ids(30)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    for spec, spans in (("autopasta(alpha=1.0)", [(3, 9)]), ("autopasta", None)):
        with Sieve(spec).attach(model) as cache, torch.no_grad():
            if spans:
                highlight(cache, spans, 30)
            assert torch.equal(model(ids, past_key_values=cache).logits, ref), spec


def test_autopasta_bias_is_pastas_scaling() -> None:
    """Softmax with the bias equals PASTA's rule: non-highlighted prompt tokens x alpha, rows renormalised, in the
    chosen heads only."""
    gen = torch.Generator().manual_seed(0)
    b, h, g, t, d = 1, 2, 2, 12, 8
    obs = Observation(
        layer_idx=1, n_layers=2, keys=torch.randn(b, h, t, d, generator=gen), values=torch.randn(b, h, t, d),
        queries=torch.randn(b, h * g, 3, d, generator=gen), positions=torch.arange(t).expand(b, h, t), valid=None,
        attention=None, state={}, n_new=3, scaling=d**-0.5, budget=t,
        shared={"autopasta": {"spans": [(2, 5)], "limit": 10}},
    )  # fmt: skip
    method = build("autopasta(alpha=0.1, heads=['1.2'])")
    bias = method.logit_bias(obs)
    logits = torch.randn(b, h * g, 3, t, generator=gen)
    got = (logits + bias).softmax(-1)
    plain = logits.softmax(-1)
    scale = torch.ones(t)
    scale[[0, 1, 5, 6, 7, 8, 9]] = 0.1  # prompt tokens (< 10) outside [2, 5); generated ones (>= 10) untouched
    want = plain.clone()
    want[:, 2] = plain[:, 2] * scale / (plain[:, 2] * scale).sum(-1, keepdim=True)
    torch.testing.assert_close(got, want)
    assert bias[:, [0, 1, 3]].abs().max() == 0 and bias[0, 2, 0, 0] == pytest.approx(math.log(0.1))


def test_autopasta_steering_changes_the_output_and_profiles(tmp_path: Path) -> None:
    model = make_model("llama")
    ids = prompt_ids(30)
    with Sieve("autopasta(alpha=0.01)").attach(model) as cache, torch.no_grad():
        highlight(cache, [(3, 9)], 30)
        steered = model(ids, past_key_values=cache).logits[0, -1]
    with torch.no_grad():
        assert (steered - model(ids).logits[0, -1]).abs().max() > 1e-4
    samples = [(prompt_ids(24, seed=s), 2, (4, 10)) for s in range(2)]
    path = profile_heads(model, samples, tmp_path / "pasta.json", top_layers=1)
    heads = load_heads(path, n_heads=2)
    assert 1 <= len(heads) <= 2 and all(h.count(".") == 1 for h in heads)
    with Sieve(f"autopasta(profile={str(path)!r}, n_heads=2)").attach(model) as cache, torch.no_grad():
        highlight(cache, [(3, 9)], 30)
        model(ids, past_key_values=cache)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for p, fragment in ((tmp_path / "missing.json", "does not exist"), (bad, "not an autopasta profile")):
        with pytest.raises(KVSieveError, match=fragment):
            build(f"autopasta(profile={str(p)!r})")
    with Sieve("autopasta").attach(model) as cache, pytest.raises(KVSieveError, match="within the prompt"):
        highlight(cache, [(3, 40)], 30)


# --- the multi-document task ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.mark.integration
def test_multidoc_places_the_answer_document_by_depth(tokenizer) -> None:
    task = get_task("multidoc_qa")
    samples = task.generate(tokenizer, 600, 5, seed=1)
    assert [s.meta["gold_document"] for s in samples] == [0, 1, 2, 3, 4]
    for s in samples:
        chars = s.meta["document_chars"]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chars))  # contiguous
        gold = chars[s.meta["gold_document"]]
        assert s.meta["fact"] in s.context[gold[0] : gold[1]] and s.answers[0] in s.context[gold[0] : gold[1]]
        assert abs(s.n_tokens - 600) <= 6
        prompt = "<head>" + s.prompt
        spans = document_token_spans(tokenizer, prompt, len("<head>"), s)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert all(tokenizer.decode(ids[a : a + 3]).startswith("Document") for a, _ in spans)
        assert [b for _, b in spans[:-1]] == [a for a, _ in spans[1:]]
