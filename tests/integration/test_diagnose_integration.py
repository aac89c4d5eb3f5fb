"""``kvsieve diagnose`` and the head-level methods on the embedded SmolLM2-135M.

The sink profile must match what ../shared/research/stack.md section 5 measured with eager attention on pydoc prose
(1000 tokens, queries at positions >= 100): strong token-0 sinks in layers 12-29 (mean mass >= 0.25), none in
layers 0-2, and the sink sitting on token 0 itself (first 4 tokens ~ token 0).
"""

from __future__ import annotations

import json

import pytest
import torch

from kvsieve.cli import main
from kvsieve.diagnose import load_profile
from kvsieve.diagnose.cli import default_text
from kvsieve.methods import build
from kvsieve.sieve import Sieve


@pytest.fixture(scope="module")
def profile(smollm2, tmp_path_factory):
    """``kvsieve diagnose`` with its defaults (1000 tokens of pydoc prose, queries >= 100), read back from JSON."""
    out = tmp_path_factory.mktemp("diagnose")
    assert main(["diagnose", "--out", str(out), "--json"]) == 0
    assert (out / "diagnosis.html").stat().st_size > 10_000
    data = json.loads((out / "diagnosis.json").read_text())
    assert data["input"]["n_tokens"] == 1000 and data["input"]["query_start"] == 100
    return data


def test_sink_profile_matches_the_measured_one(profile):
    per_layer = [row["sink0"] for row in profile["layers"]]
    first4 = [row["first_k"] for row in profile["layers"]]
    strong = {i: round(per_layer[i], 3) for i in range(12, 30)}
    assert all(v >= 0.25 for v in strong.values()), strong
    assert all(per_layer[i] < 0.05 for i in range(3)), per_layer[:3]
    assert all(abs(first4[i] - per_layer[i]) < 0.01 for i in range(12, 30))  # the sink is token 0 itself
    assert profile["summary"]["sink_layers"] == list(range(12, 30))
    assert 0.25 <= profile["summary"]["mean_sink0"] <= 0.35  # stack.md: 0.303 on this text


def test_massive_activations_ride_on_token_zero(profile):
    # the residual stream carries one huge dimension on token 0 from layer 11 on: that is what makes the sink
    for row in profile["layers"][11:28]:
        m = row["massive"]
        assert m["carriers"][:1] == [0] and m["massive_dims"], (row["layer"], m)
        assert m["max_abs"] > 1000
    assert not profile["layers"][0]["massive"]["massive_dims"]


def test_hidden_sinks_live_in_the_early_middle_layers(profile):
    # layers 3-9 park attention on a few later tokens (hidden sinks, as ACT describes); layers 12-27 do not
    early = [len(row["hidden_sinks"]) for row in profile["layers"][3:10]]
    assert all(n > 0 for n in early), early
    later = sum(row["hidden_sink_mass"] for row in profile["layers"][12:28]) / 16
    assert later < 0.01


@pytest.mark.parametrize("name", ["duoattention", "razorattention"])
def test_head_methods_hold_full_kv_only_for_retrieval_heads(smollm2, name):
    model, tok = smollm2
    method = build(name)
    retrieval = load_profile(None).top_kv_heads(method.ratio)  # (30, 3) bool
    ids = default_text(tok, 400)
    budget = 64
    with Sieve(method, budget=budget).attach(model) as cache, torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for layer, kept in enumerate(cache.kv_tokens()):
        per_head = kept if isinstance(kept, list) else [kept] * 3
        want = [400 if bool(retrieval[layer, h]) else budget for h in range(3)]
        assert per_head == want, (layer, per_head, want)
    n_full = int(retrieval.sum())
    bytes_per_token_head = 2 * 64 * 4  # K and V, head_dim 64, fp32
    assert cache.kv_bytes() == (n_full * 400 + (90 - n_full) * budget) * bytes_per_token_head


def test_calibration_with_neutral_parameters_is_full_attention_on_smollm2(smollm2):
    model, tok = smollm2
    ids = default_text(tok, 120)
    outs = []
    for spec in ("full", "zerotuning(gamma=1.0)", "act(beta=1.0)"):
        with Sieve(spec).attach(model) as cache, torch.no_grad():
            outs.append(model(input_ids=ids, past_key_values=cache, use_cache=True).logits)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with Sieve("zerotuning(gamma=0.5)").attach(model) as cache, torch.no_grad():
        changed = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    assert not torch.equal(outs[0], changed)
