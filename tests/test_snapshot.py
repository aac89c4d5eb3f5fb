"""One prefill, many methods: a snapshot's compressed cache equals running the method on its own."""

from __future__ import annotations

import pytest
import torch

from kvsieve import Budget, KVSieveError, Sieve, build
from kvsieve.snapshot import PrefillSnapshot
from tiny_models import make_model, prompt_ids

METHODS = ["full", "snapkv", "h2o", "a2sf", "tova", "knorm", "random(seed=2)", "streaming_llm", "adakv:snapkv"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_snapshot_equals_running_each_method_alone(arch):
    model = make_model(arch)
    ids = prompt_ids(60)
    specs = [m for m in METHODS if not (arch == "gemma3" and m == "streaming_llm")]
    methods = [build(m) for m in specs]
    snap = PrefillSnapshot(model, ids, methods)
    follow = prompt_ids(3, seed=9)
    for spec, method in zip(specs, methods, strict=True):
        sieve = Sieve(spec) if spec == "full" else Sieve(spec, compression=0.5)
        with sieve.attach(model) as alone, torch.no_grad():
            model(ids, past_key_values=alone)
            shared = snap.compress(method, sieve.budget)
            assert shared.kv_tokens() == alone.kv_tokens(), spec
            for a, b in zip(alone.sieve_layers(), shared.sieve_layers(), strict=True):
                for sa, sb in zip(a.segments, b.segments, strict=True):
                    assert torch.equal(sa.positions, sb.positions), spec
                    assert torch.equal(sa.keys, sb.keys) and torch.equal(sa.values, sb.values), spec
            # and the two caches carry on identically (question tokens appended without eviction)
            with alone.paused(), shared.paused():
                la = model(follow, past_key_values=alone).logits
                lb = model(follow, past_key_values=shared).logits
            assert torch.equal(la, lb), spec


def test_snapshot_leaves_its_full_cache_intact():
    model = make_model("llama")
    ids = prompt_ids(40)
    snap = PrefillSnapshot(model, ids, [build("knorm")])
    before = [s.keys.clone() for layer in snap.full_cache.sieve_layers() for s in layer.segments]
    with Sieve("knorm", compression=0.5).attach(model):
        snap.compress(build("knorm"), Budget(compression=0.5))
    with Sieve("full").attach(model):
        snap.compress(build("full"), None)
    after = [s.keys for layer in snap.full_cache.sieve_layers() for s in layer.segments]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert snap.full_cache.kv_tokens() == [40, 40]


def test_snapshot_refuses_a_method_it_did_not_record():
    model = make_model("llama")
    snap = PrefillSnapshot(model, prompt_ids(20), [build("knorm")])
    with Sieve("snapkv", compression=0.5).attach(model), pytest.raises(KVSieveError, match="did not record"):
        snap.compress(build("snapkv"), Budget(compression=0.5))
    with pytest.raises(KVSieveError, match="inside"):
        snap.compress(build("knorm"), Budget(compression=0.5))


def test_snapshot_refuses_methods_it_cannot_replay():
    from kvsieve.snapshot import shareable

    assert shareable(build("snapkv")) and shareable(build("adakv:snapkv"))
    assert not shareable(build("zerotuning"))  # biases attention during the prefill itself
    # wrappers that only pass hooks on are as shareable as what they wrap
    assert shareable(build("tokenselect")) and shareable(build("quest(read_budget=64):snapkv"))
    # storage methods replay their pack() and merging methods their merge(): the replay runs the same pipeline
    assert shareable(build("kivi:snapkv")) and shareable(build("kivi:adakv:snapkv")) and shareable(build("ems"))
    model = make_model("llama")
    snap = PrefillSnapshot(model, prompt_ids(20), [build("knorm")])
    with Sieve("zerotuning").attach(model), pytest.raises(KVSieveError, match="on its own"):
        snap.compress(build("zerotuning"), None)
