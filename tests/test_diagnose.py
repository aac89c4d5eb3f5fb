"""Diagnose statistics on hand-built queries and keys against naive references; head methods and calibration on
tiny models (neutral parameters change nothing; memory per head is what the method promises)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kvsieve.attention import causal_allowed
from kvsieve.cli import main
from kvsieve.diagnose import AttentionProfiler, HeadProfile, ProfileError, StatsConfig, masked_heads
from kvsieve.diagnose.diagnosis import default_map_heads, diagnose
from kvsieve.diagnose.profile import load_profile, shipped_profile_path
from kvsieve.diagnose.retrieval import ArgmaxTracer
from kvsieve.diagnose.stats import _outliers
from kvsieve.errors import BudgetError, KVSieveError
from kvsieve.methods import build
from kvsieve.methods.base import LayerContext, Observation
from kvsieve.sieve import Sieve
from tiny_models import prompt_ids


def naive_probs(query, keys, scaling):
    """Eager softmax attention (B, Hq, q, T) with the new queries last, GQA by repetition."""
    _, hq, q, _ = query.shape
    h, t = keys.shape[1], keys.shape[2]
    k = keys.repeat_interleave(hq // h, dim=1)
    logits = (query @ k.transpose(-1, -2)) * scaling
    return logits.masked_fill(~causal_allowed(q, t, None), float("-inf")).softmax(-1)


def make_obs(t=40, h=2, g=2, d=8, seed=0, sink_bias=0.0, n_new=None, layer_idx=0, n_layers=1):
    torch.manual_seed(seed)
    n_new = t if n_new is None else n_new
    keys = torch.randn(1, h, t, d)
    queries = torch.randn(1, h * g, n_new, d)
    if sink_bias:  # make key 0 (and key 7) attract attention: aligned with every query's mean direction
        direction = queries.mean(dim=(0, 1, 2))
        keys[0, :, 0] += sink_bias * direction
        keys[0, :, 7] += 0.6 * sink_bias * direction
    return Observation(
        layer_idx=layer_idx,
        n_layers=n_layers,
        keys=keys,
        values=torch.randn(1, h, t, d),
        queries=queries,
        positions=torch.arange(t).expand(1, h, t).clone(),
        valid=None,
        attention=None,
        state={},
        n_new=n_new,
        scaling=0.4,
        budget=t,
    )


@pytest.mark.parametrize("chunk", [7, 64])
def test_profiler_statistics_match_naive_attention(chunk):
    cfg = StatsConfig(
        first_k=3,
        window=4,
        query_start=5,
        sink_threshold=0.1,
        sink_min_seen=4,
        map_size=8,
        chunk=chunk,
        dormant_threshold=0.5,
    )
    obs = make_obs(sink_bias=3.0)
    prof = AttentionProfiler(cfg, n_tokens=40)
    prof.observe(obs)
    res = prof.results()
    stats = res["stats"]
    p = naive_probs(obs.queries, obs.keys, obs.scaling)[0]  # (Hq, q, T)
    rows = p[:, 5:]  # counted queries
    qi = torch.arange(5, 40)
    torch.testing.assert_close(stats["sink0"][0], rows[..., 0].mean(-1).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["first_k"][0], rows[..., :3].sum(-1).mean(-1).double(), rtol=1e-5, atol=1e-6)
    local = torch.stack([rows[:, i, max(0, int(a) - 3) : int(a) + 1].sum(-1) for i, a in enumerate(qi)], dim=1)
    torch.testing.assert_close(stats["local"][0], local.mean(-1).double(), rtol=1e-5, atol=1e-6)
    ent = -(rows * rows.clamp(min=1e-30).log()).sum(-1)
    torch.testing.assert_close(stats["entropy"][0], ent.mean(-1).double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stats["entropy_norm"][0], (ent / torch.log(qi + 1.0)).mean(-1).double(), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(stats["dormant_frac"][0], (rows[..., 0] >= 0.5).double().mean(-1))
    v = obs.values[0].repeat_interleave(2, dim=0)
    torch.testing.assert_close(stats["output_norm"][0], (rows @ v).norm(dim=-1).mean(-1).double(), rtol=1e-4, atol=1e-5)
    col = rows.sum(1)  # (Hq, T) accumulated attention
    ranked = col.sort(-1, descending=True).values
    torch.testing.assert_close(
        stats["hh_top1"][0], (ranked[:, :1].sum(-1) / col.sum(-1)).double(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        stats["hh_top10"][0], (ranked[:, :4].sum(-1) / col.sum(-1)).double(), rtol=1e-5, atol=1e-6
    )
    # hidden sinks: ACT's rule, mean over the counted queries that see each key, beyond position 0
    seen = (torch.arange(40)[None, :] <= qi[:, None]).sum(0).clamp(min=1)
    mean = col / seen
    is_sink = (mean > 0.1) & (seen >= 4)
    is_sink[:, 0] = False
    assert is_sink[:, 7].any(), "the planted sink at position 7 must be found"
    torch.testing.assert_close(stats["hidden_sink_count"][0], is_sink.sum(-1).double())
    torch.testing.assert_close(
        stats["hidden_sink_mass"][0], ((col * is_sink).sum(-1) / 35).double(), rtol=1e-5, atol=1e-6
    )
    assert {s["position"] for s in res["hidden_sinks"][0]} == set(is_sink.nonzero()[:, 1].tolist())
    # pooled map: every query row, key bins of 5 tokens, mean over rows of each query bin; rows sum to 1
    maps = res["maps"][0]
    full = p.reshape(4, 8, 5, 8, 5).sum(-1).mean(2)
    torch.testing.assert_close(maps, full.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 8, dtype=torch.float64))


def test_profiler_needs_one_pass_and_batch_one():
    prof = AttentionProfiler(StatsConfig(), n_tokens=40)
    prof.observe(make_obs())
    with pytest.raises(KVSieveError, match="one forward pass"):
        prof.observe(make_obs())
    obs = make_obs()
    obs.keys = obs.keys.expand(2, -1, -1, -1)
    with pytest.raises(KVSieveError, match="batch size 1"):
        AttentionProfiler(StatsConfig(), n_tokens=40).observe(obs)


def test_stats_config_rejects_bad_values():
    with pytest.raises(KVSieveError, match="window"):
        StatsConfig(window=0)
    with pytest.raises(KVSieveError, match="sink_threshold"):
        StatsConfig(sink_threshold=1.5)


def test_massive_activation_outliers():
    torch.manual_seed(0)
    hidden = torch.randn(20, 16) * 0.1
    hidden[0, 5] = 500.0
    hidden[3, 5] = -300.0
    hidden[7, 2] = 50.0  # large but below the absolute threshold of 100
    rec = _outliers(hidden, StatsConfig(), top=3)
    assert rec["massive_dims"] == [5]
    assert rec["carriers"] == [0, 3]
    assert rec["top"][0] == {"position": 0, "dim": 5, "value": 500.0}
    assert rec["top"][1]["value"] == -300.0
    assert rec["max_abs"] == 500.0 and rec["ratio"] > 1000


def test_diagnose_on_a_tiny_model_is_json_and_leaves_the_model_clean(llama):
    ids = prompt_ids(48, seed=3)
    before = (llama.config._attn_implementation, sum(len(m._forward_hooks) for m in llama.modules()))
    d = diagnose(llama, ids, config=StatsConfig(query_start=8, map_size=8), map_heads=[(1, 2)])
    after = (llama.config._attn_implementation, sum(len(m._forward_hooks) for m in llama.modules()))
    assert before == after
    json.dumps(d, allow_nan=False)
    assert d["n_layers"] == 2 and d["n_heads"] == 4 and d["n_kv_heads"] == 2
    assert len(d["head_stats"]["sink0"]) == 2 and len(d["head_stats"]["sink0"][0]) == 4
    assert list(d["maps"]["heads"]) == ["1.2"] and len(d["maps"]["heads"]["1.2"]) == 8
    assert d["input"]["counted_queries"] == 40
    assert all(row["massive"] is not None for row in d["layers"])
    again = diagnose(llama, ids, config=StatsConfig(query_start=8, map_size=8), map_heads=[(1, 2)])
    assert again["head_stats"] == d["head_stats"]  # same input, same numbers


def test_default_map_heads_pick_distinct_extremes():
    sink = torch.zeros(3, 4)
    sink[2, 1] = 0.9
    local = torch.zeros(3, 4)
    local[0, 3] = 0.8
    stats = {"sink0": sink, "local": local, "entropy_norm": local.clone(), "hidden_sink_mass": torch.zeros(3, 4)}
    picks = default_map_heads(stats, None)
    assert picks[0] == (2, 1) and picks[1] == (0, 3) and len(picks) == len(set(picks))


# ------------------------------------------------------------------------------------------------ retrieval
def test_argmax_tracer_reads_the_last_query_per_head():
    obs = make_obs(t=12, n_new=3)
    obs.keys[0, 1, 9] = obs.queries[0, 3, -1] * 10  # query head 3 (KV head 1) looks at key 9
    tracer = ArgmaxTracer()
    tracer.observe(obs)
    logits = obs.queries[0, :, -1] @ obs.keys[0].repeat_interleave(2, dim=0).transpose(-1, -2)
    want = torch.stack([logits[i, i].argmax() for i in range(4)])
    assert torch.equal(tracer.argmax[0], want)
    assert int(tracer.argmax[0][3]) == 9


def test_masked_heads_equal_zeroed_output_weights_and_remove_the_hook(llama):
    ids = prompt_ids(10)
    with torch.no_grad():
        base = llama(ids).logits
        with masked_heads(llama, [(1, 2), (0, 0)]):
            masked = llama(ids).logits
        again = llama(ids).logits
        reference = copy.deepcopy(llama)  # the same heads silenced by zeroing their columns of o_proj
        reference.model.layers[1].self_attn.o_proj.weight[:, 2 * 16 : 3 * 16] = 0
        reference.model.layers[0].self_attn.o_proj.weight[:, 0:16] = 0
        want = reference(ids).logits
    torch.testing.assert_close(masked, want)
    assert not torch.equal(base, masked) and torch.equal(base, again)
    assert all(not m._forward_pre_hooks for m in llama.modules())
    with pytest.raises(KVSieveError, match="does not exist"), masked_heads(llama, [(5, 0)]):
        pass


# ------------------------------------------------------------------------------------------------ profiles
def tiny_profile(scores, n_kv=2) -> HeadProfile:
    scores = [list(map(float, row)) for row in scores]
    return HeadProfile(
        model="tiny", n_layers=len(scores), n_heads=len(scores[0]), n_kv_heads=n_kv, head_dim=16, retrieval=scores
    )


def test_profile_kv_scores_and_top_heads(tmp_path):
    prof = tiny_profile([[0.0, 0.5, 0.1, 0.0], [0.2, 0.2, 0.0, 0.9]])
    assert prof.kv_scores().tolist() == [[0.5, 0.1], [0.2, 0.9]]  # max over each GQA group
    assert prof.top_kv_heads(0.5).tolist() == [[True, False], [False, True]]
    assert prof.top_kv_heads(0.0).sum() == 0 and prof.top_kv_heads(1.0).all()
    path = prof.save(tmp_path / "p.json")
    assert HeadProfile.load(path).retrieval == prof.retrieval
    with pytest.raises(ProfileError, match="kvsieve diagnose"):
        prof.check(n_layers=30, n_kv_heads=3, group=3, head_dim=64)
    with pytest.raises(ProfileError, match="does not exist"):
        HeadProfile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ProfileError, match="not a kvsieve head profile"):
        HeadProfile.load(tmp_path / "bad.json")


def test_shipped_profile_matches_the_embedded_model():
    assert shipped_profile_path().is_file()
    prof = load_profile(None)
    prof.check(n_layers=30, n_kv_heads=3, group=3, head_dim=64)
    scores = prof.scores()
    assert scores.min() >= 0 and scores.max() <= 1
    assert (scores > 0.1).sum() < 0.1 * scores.numel(), "retrieval heads are few"
    assert prof.meta.get("command")


# ------------------------------------------------------------------------------------------------ head methods
@pytest.fixture
def tiny_profile_path(tmp_path):
    # layer 0: KV head 1 is a retrieval head (query head 3); layer 1: no retrieval head
    return str(tiny_profile([[0.0, 0.0, 0.0, 0.8], [0.0, 0.1, 0.0, 0.0]]).save(tmp_path / "tiny.json"))


def run_prompt(model, sieve, ids, steps=3):
    with sieve.attach(model) as cache, torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1])
    return cache, torch.stack(logits)


@pytest.mark.parametrize("name", ["duoattention", "razorattention"])
def test_head_methods_keep_every_token_of_retrieval_heads_only(llama, tiny_profile_path, name):
    method = build(f"{name}(ratio=0.25, profile={tiny_profile_path!r})")
    ids = prompt_ids(40, seed=5)
    cache, _ = run_prompt(llama, Sieve(method, budget=12, interval=1), ids, steps=3)
    per_head = cache.kv_tokens()
    assert per_head[0] == [12, 43], per_head  # layer 0: streaming KV head 0 capped, retrieval KV head 1 full
    assert per_head[1] == 12  # layer 1: both KV heads stream
    bytes_per_token_head = 2 * 16 * 4  # K and V, head_dim 16, fp32
    assert cache.kv_bytes() == (12 + 43 + 2 * 12) * bytes_per_token_head


@pytest.mark.parametrize("name", ["duoattention", "razorattention"])
def test_head_methods_at_full_budget_equal_full_attention(llama, tiny_profile_path, name):
    ids = prompt_ids(30, seed=2)
    _, ref = run_prompt(llama, Sieve("full"), ids)
    _, got = run_prompt(llama, Sieve(build(f"{name}(profile={tiny_profile_path!r})"), budget=64, interval=1), ids)
    assert torch.equal(got, ref)


def test_duoattention_streaming_heads_keep_sinks_and_recent(llama, tiny_profile_path):
    method = build(f"duoattention(ratio=0.25, n_sink=2, profile={tiny_profile_path!r})")
    cache, _ = run_prompt(llama, Sieve(method, budget=10, interval=1), prompt_ids(30, seed=1), steps=0)
    layer = cache.layers[1]
    assert layer.segments[0].positions[0, 0].tolist() == [0, 1, *range(22, 30)]


def test_head_methods_reject_a_profile_for_another_model(llama):
    method = build("duoattention")  # the shipped profile is for smollm2-135m (30 layers x 3 KV heads)
    with pytest.raises(ProfileError, match="kvsieve diagnose"):
        run_prompt(llama, Sieve(method, budget=8, interval=1), prompt_ids(20), steps=0)


def test_head_methods_reject_too_small_budgets(tiny_profile_path):
    with pytest.raises(BudgetError, match="sink"):
        Sieve(build(f"razorattention(n_sink=4, profile={tiny_profile_path!r})"), budget=5, interval=1)
    with pytest.raises(KVSieveError, match="ratio"):
        build("duoattention(ratio=1.5)")


def test_razorattention_compensation_token_is_the_mean_of_dropped_tokens(tiny_profile_path):
    method = build(f"razorattention(ratio=0.0, n_sink=2, profile={tiny_profile_path!r})")
    obs = make_obs(t=12, h=2, g=2, d=16, n_new=12, layer_idx=1, n_layers=2)
    obs.budget = 6
    method.observe(obs)  # the oldest non-sink token (position 2) becomes each head's compensation slot
    assert obs.state["razor_slot"][0, :, 2].tolist() == [1.0, 1.0] and obs.state["razor_slot"].sum() == 2
    keep = method.select([method.score(obs)], 6, LayerContext(1, 2, 12, 12))[0]
    assert keep[0].tolist() == [[0, 1, 2, 9, 10, 11]] * 2  # sinks, the slot, the 3 most recent
    keys, values = method.merge(obs, keep)
    dropped = [2, 3, 4, 5, 6, 7, 8]
    torch.testing.assert_close(keys[0, :, 2], obs.keys[0, :, dropped].mean(1))
    torch.testing.assert_close(values[0, :, 2], obs.values[0, :, dropped].mean(1))
    torch.testing.assert_close(keys[0, :, [0, 1, 3, 4, 5]], obs.keys[0, :, [0, 1, 9, 10, 11]])
    assert obs.state["razor_count"][0, :, 2].tolist() == [7.0, 7.0]
    # the compensation token stands for 7 tokens: its logit is raised by log 7
    bias = method.logit_bias(obs)
    assert bias.shape == (1, 4, 12, 12)
    torch.testing.assert_close(bias[0, :, :, 2], torch.full((4, 12), math.log(7.0)))
    assert float(bias[..., [0, 1, 3]].abs().max()) == 0.0


def test_razorattention_running_mean_over_evictions(llama, tiny_profile_path):
    """Decoding past the budget folds each token leaving the window into the slot: the slot's value is the mean of
    every value dropped so far (layer 1 holds only streaming heads, so the core calls merge from the first eviction)."""
    method = build(f"razorattention(ratio=0.25, n_sink=2, profile={tiny_profile_path!r})")
    values_seen = {}
    v_proj = llama.model.layers[1].self_attn.v_proj
    handle = v_proj.register_forward_hook(lambda m, a, o: values_seen.setdefault("v", []).append(o.detach()))
    cache, _ = run_prompt(llama, Sieve(method, budget=8, interval=1), prompt_ids(20, seed=9), steps=4)
    handle.remove()
    v_all = torch.cat(values_seen["v"], dim=1).view(1, -1, 2, 16).transpose(1, 2)  # (1, KV heads, 24, 16)
    seg = cache.layers[1].segments[0]
    assert seg.positions[0, 0].sort().values.tolist() == [0, 1, 2, *range(19, 24)]
    assert seg.positions[0, 0, 2] == 2  # the compensation slot never moves
    assert seg.state["razor_count"][0, :, 2].tolist() == [17.0, 17.0]  # positions 2..18
    torch.testing.assert_close(seg.values[0, :, 2], v_all[0, :, 2:19].mean(1), rtol=1e-5, atol=1e-6)


def test_razorattention_compensation_in_a_mixed_layer_at_the_first_eviction(llama, tiny_profile_path):
    """The eviction that splits a layer mixing both kinds of heads into per-head storage also merges (per head)."""
    method = build(f"razorattention(ratio=0.25, n_sink=2, profile={tiny_profile_path!r})")
    values_seen = []
    v_proj = llama.model.layers[0].self_attn.v_proj
    handle = v_proj.register_forward_hook(lambda m, a, o: values_seen.append(o.detach()))
    cache, _ = run_prompt(llama, Sieve(method, budget=8, interval=1), prompt_ids(20, seed=9), steps=3)
    handle.remove()
    v_all = torch.cat(values_seen, dim=1).view(1, -1, 2, 16).transpose(1, 2)
    streaming = cache.layers[0].segments[0]  # layer 0: KV head 0 streams, KV head 1 is a retrieval head
    assert streaming.positions[0, 0].sort().values.tolist() == [0, 1, 2, *range(18, 23)]
    assert streaming.positions[0, 0, 2] == 2
    assert streaming.state["razor_count"][0, 0, 2] == 16.0  # positions 2..17
    torch.testing.assert_close(streaming.values[0, 0, 2], v_all[0, 0, 2:18].mean(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("spec", ["zerotuning(gamma=1.0)", "zerotuning(gamma=1.0, heads=['0.1']):act(beta=1.0)"])
def test_calibration_with_neutral_parameters_changes_nothing(arch_model, spec):
    ids = prompt_ids(24, seed=4)
    _, ref = run_prompt(arch_model, Sieve("full"), ids)
    _, got = run_prompt(arch_model, Sieve(spec), ids)
    assert torch.equal(got, ref)


def test_calibration_wrapping_an_evicting_method_with_neutral_parameters_equals_the_method(llama):
    ids = prompt_ids(40, seed=6)
    _, ref = run_prompt(llama, Sieve("snapkv(window=4)", budget=16, interval=1), ids)
    _, got = run_prompt(llama, Sieve("zerotuning(gamma=1.0):snapkv(window=4)", budget=16, interval=1), ids)
    assert torch.equal(got, ref)
    with pytest.raises(BudgetError):
        Sieve("zerotuning(gamma=0.5):snapkv")  # an evicting inner method needs a budget


def softmax_rows(obs, bias=None):
    p_logits = (obs.queries[0] @ obs.keys[0].repeat_interleave(obs.group_size, 0).transpose(-1, -2)) * obs.scaling
    if bias is not None:
        p_logits = p_logits + bias[0]
    allowed = causal_allowed(obs.n_new, obs.keys.shape[2], None)[0]
    return p_logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def test_zerotuning_scales_token_zero_by_gamma_and_renormalises():
    obs = make_obs(t=10, n_new=10)
    method = build("zerotuning(gamma=0.5, heads=['0.1', '0.3'])")
    bias = method.logit_bias(obs)
    p, p2 = softmax_rows(obs), softmax_rows(obs, bias)
    for head in range(4):
        if head in (1, 3):
            scaled = p[head].clone()
            scaled[:, 0] *= 0.5
            torch.testing.assert_close(p2[head], scaled / scaled.sum(-1, keepdim=True))
        else:
            torch.testing.assert_close(p2[head], p[head])
    obs.positions = obs.positions + 1  # token 0 evicted: nothing to scale
    assert method.logit_bias(obs) is None


def test_act_reduces_hidden_sinks_by_beta_and_redistributes():
    obs = make_obs(t=40, n_new=40, sink_bias=3.0)
    method = build("act(beta=0.4, threshold=0.1)")
    bias = method.logit_bias(obs)
    p, p2 = softmax_rows(obs), softmax_rows(obs, bias)
    # ACT's rule: sinks are keys beyond position 0 whose mean attention over the queries that see them > threshold
    seen = torch.arange(40, 0, -1)
    sinks = (p.sum(1) / seen) > 0.1
    sinks[:, 0] = False
    assert sinks[:, 7].any() and sinks.sum() < sinks.numel() // 4  # a planted sink, not everything
    for head in range(4):
        s = sinks[head]
        want = p[head].clone()
        mass = want[:, s].sum(-1, keepdim=True)
        want[:, s] *= 0.4
        rest = ~s
        want[:, rest] += 0.6 * mass * want[:, rest] / want[:, rest].sum(-1, keepdim=True)
        torch.testing.assert_close(p2[head], want, rtol=1e-4, atol=1e-6)


def test_calibration_heads_syntax_is_checked():
    with pytest.raises(KVSieveError, match="heads"):
        build("zerotuning(heads=['x'])")
    with pytest.raises(KVSieveError, match="gamma"):
        build("zerotuning(gamma=0.0)")
    with pytest.raises(KVSieveError, match="beta"):
        build("act(beta=1.5)")


def test_calibration_specs_round_trip():
    for spec in ("zerotuning(gamma=0.8)", "act(beta=0.5):snapkv", "zerotuning(gamma=1.2, heads=['0-3']):h2o"):
        assert build(build(spec).spec()).spec() == build(spec).spec()


def test_calibration_changes_outputs_on_a_tiny_model(llama):
    ids = prompt_ids(24, seed=4)
    _, ref = run_prompt(llama, Sieve("full"), ids)
    _, zt = run_prompt(llama, Sieve("zerotuning(gamma=0.2)"), ids)
    assert not torch.equal(zt, ref)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["diagnose", "--text-file", "/nonexistent/notes.txt"], "does not exist"),
        (["diagnose", "--heads", "14-3"], "layer.head pairs"),
        (["diagnose", "--task", "no_such_task"], "unknown task"),
        (["diagnose", "--length", "1"], "at least 2 tokens"),
    ],
)
def test_diagnose_cli_rejects_bad_input_before_loading_the_model(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
