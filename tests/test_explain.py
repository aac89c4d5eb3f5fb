"""kvsieve.explain: every attribution method on a tiny model, against naive references where one exists; the
faithfulness metrics by hand; JSON and HTML; the CLI; and every bad input as a one-line error before heavy work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import kvsieve.explain
from kvsieve import KVSieveError, Sieve
from kvsieve.cli import main
from kvsieve.explain import ATTRIBUTIONS, explain
from kvsieve.explain.attention_maps import attention_maps, attention_rollout, fai
from kvsieve.explain.faithfulness import measure, n_tokens
from kvsieve.explain.gradients import input_x_gradient, integrated_gradients, saliency
from kvsieve.explain.problem import Problem
from kvsieve.explain.scorer import layer_scores, rank_percentiles
from kvsieve.models import load_model
from tiny_model_dir import save_tiny_model_dir

PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18"
FAST = {"reagent": "reagent(num_probes=2, max_steps=4)", "integrated_gradients": "integrated_gradients(n_steps=8)"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    return load_model(save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def problem(tiny) -> Problem:
    model, tok = tiny
    ids = tok(PROMPT + " w20 w21 w22", return_tensors="pt").input_ids
    return Problem(model, tok, ids, n_prompt=ids.shape[1] - 3, seed=3)


def _names() -> list[str]:
    return [FAST.get(n, n) for n in ATTRIBUTIONS] + ["method:snapkv(window=4)", "method:h2o", "method:tova"]


def test_every_method_scores_each_context_and_nothing_beyond(tiny) -> None:
    model, tok = tiny
    result = explain(model, tok, PROMPT, target=" w20 w21 w22", method=_names())
    n_prompt = result.n_prompt
    for name, scores in result.scores.items():
        assert scores.shape == (3, n_prompt + 2), name
        for t in range(3):
            assert torch.isfinite(scores[t, : n_prompt + t]).all(), (name, t)
            assert torch.isnan(scores[t, n_prompt + t :]).all(), (name, t)
        assert result.info[name]["seconds"] >= 0


def test_same_seed_same_scores(tiny) -> None:
    model, tok = tiny
    names = [FAST["reagent"], "random"]
    a = explain(model, tok, PROMPT, target=" w20", method=names, seed=5)
    b = explain(model, tok, PROMPT, target=" w20", method=names, seed=5)
    c = explain(model, tok, PROMPT, target=" w20", method=names, seed=6)
    for name in names:
        assert torch.equal(a.scores[name].nan_to_num(), b.scores[name].nan_to_num())
    assert not torch.equal(a.scores["random"].nan_to_num(), c.scores["random"].nan_to_num())


def _reference_grad(problem: Problem, t: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """d p(target_t) / d embeddings, from a forward pass of step t's context alone."""
    n = problem.n_prompt + t
    emb = problem.model.get_input_embeddings()(problem.ids[:, :n]).detach()
    x = (emb * scale).requires_grad_(True)
    p = problem.model(inputs_embeds=x, use_cache=False).logits[0, -1].float().softmax(-1)[problem.targets[t]]
    (g,) = torch.autograd.grad(p, x)
    return g[0], emb[0]


def test_gradient_methods_match_a_per_step_reference(problem) -> None:
    sal, ixg = saliency(problem), input_x_gradient(problem)
    ig1 = integrated_gradients(problem, n_steps=1)  # one Gauss-Legendre node: alpha 0.5, weight 1
    for t in range(problem.n_steps):
        n = problem.n_prompt + t
        g, emb = _reference_grad(problem, t)
        torch.testing.assert_close(sal[t, :n], g.norm(dim=-1).double(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(ixg[t, :n], (g * emb).norm(dim=-1).double(), rtol=1e-4, atol=1e-9)
        g_half, _ = _reference_grad(problem, t, scale=0.5)
        torch.testing.assert_close(ig1[t, :n], (g_half * emb).norm(dim=-1).double(), rtol=1e-4, atol=1e-9)


def test_attention_baselines_match_eager_attention(problem) -> None:
    model = problem.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = model(input_ids=problem.ids, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(before)
    maps = attention_maps(problem)
    assert model.config._attn_implementation == before  # restored
    torch.testing.assert_close(maps, torch.stack([a[0] for a in ref]).float())
    n = problem.ids.shape[1]
    rollout = torch.eye(n, dtype=torch.float64)
    for a in ref:
        layer = 0.5 * a[0].mean(0).double() + 0.5 * torch.eye(n, dtype=torch.float64)
        rollout = (layer / layer.sum(-1, keepdim=True)) @ rollout
    got = attention_rollout(problem)
    for t in range(problem.n_steps):
        p = problem.query_position(t)
        torch.testing.assert_close(got[t, : p + 1], rollout[p, : p + 1])


def test_fai_is_the_mean_attention_from_later_tokens(problem) -> None:
    maps = attention_maps(problem)
    flat = maps.flatten(0, 1)
    n = maps.shape[-1]
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0).float()
    head_dist = (flat * dist).sum(-1).mean(-1)
    a = flat[head_dist > head_dist.median()].mean(0).double()
    got = fai(problem)
    for t in range(problem.n_steps):
        p = problem.query_position(t)
        for j in range(p):
            assert got[t, j].item() == pytest.approx(float(a[j + 1 : p + 1, j].mean()), rel=1e-9)


def test_method_scores_are_the_scores_the_method_evicts_by(problem) -> None:
    """The top half of method:snapkv's scores in each layer and head are the tokens snapkv keeps at 0.5."""
    scores = layer_scores(problem, "snapkv(window=4)", compression=0.5)
    prompt = problem.ids[:, : problem.n_prompt]
    with Sieve("snapkv(window=4)", compression=0.5).attach(problem.model) as cache, torch.no_grad():
        problem.model(input_ids=prompt, past_key_values=cache)
    for idx, s in scores.items():
        seg = cache.layers[idx].segments[0]
        k = seg.length
        for h in range(s.shape[0]):
            top = set(s[h].topk(k).indices.tolist())
            assert top == set(seg.positions[0, h].tolist()), (idx, h)


def test_rank_percentiles_share_ties() -> None:
    got = rank_percentiles(torch.tensor([[3.0, float("inf"), 1.0, float("inf"), 2.0]]))
    assert got.tolist() == [[0.5, 0.875, 0.0, 0.875, 0.25]]


def test_faithfulness_by_hand(problem) -> None:
    n = problem.n_prompt
    scores = problem.empty_scores()
    for t in range(problem.n_steps):
        scores[t, : n + t] = -torch.arange(n + t, dtype=torch.float64)  # earliest tokens rank highest
    got = measure(problem, {"first": scores}, shares=[0.25])
    k = n_tokens(0.25, n)
    p_full = problem.target_probs()
    comp, suff = [], []
    with torch.no_grad():
        for t in range(problem.n_steps):
            tail = problem.ids[0, n : n + t]
            target = problem.targets[t]

            def prob(prefix, tail=tail, target=target):
                seq = torch.cat([prefix, tail])[None]
                return float(problem.model(input_ids=seq).logits[0, -1].softmax(-1)[target])

            comp.append(float(p_full[t]) - prob(problem.ids[0, k:n]))
            suff.append(float(p_full[t]) - prob(problem.ids[0, :k]))
    m = got["methods"]["first"]
    assert m["comprehensiveness"]["0.25"] == pytest.approx(sum(comp) / len(comp), abs=1e-6)
    assert m["sufficiency"]["0.25"] == pytest.approx(sum(suff) / len(suff), abs=1e-6)
    assert "random" in got["methods"]


def test_batched_faithfulness_equals_one_pass_per_step(tiny) -> None:
    """measure() runs each distinct perturbed prompt once, in batches, for every step: equal (to float rounding) to
    one forward pass per (method, share, step), at a realistic prompt length."""
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tok.vocab_size, (1, 303), generator=gen)
    problem = Problem(model, tok, ids, n_prompt=300, seed=1)
    n = problem.n_prompt
    scores = {}
    for name in ("a", "b", "c"):
        s = problem.empty_scores()
        for t in range(problem.n_steps):
            s[t, : n + t] = torch.rand(n + t, generator=gen, dtype=torch.float64)
        scores[name] = s
    scores["a_again"] = scores["a"].clone()  # identical masks share one sequence
    shares = [0.1, 0.5]
    got = measure(problem, scores, shares=shares, batch=3)
    p_full = problem.target_probs()
    with torch.no_grad():
        for name, s in scores.items():
            for share in shares:
                k = n_tokens(share, n)
                comp, suff = [], []
                for t in range(problem.n_steps):
                    top = torch.zeros(n, dtype=torch.bool)
                    top[s[t, :n].argsort(descending=True, stable=True)[:k]] = True
                    tail = problem.ids[0, n : n + t]

                    def prob(keep, tail=tail, t=t):
                        seq = torch.cat([problem.ids[0, :n][keep], tail])[None]
                        return float(model(input_ids=seq).logits[0, -1].softmax(-1)[problem.targets[t]])

                    comp.append(float(p_full[t]) - prob(~top))
                    suff.append(float(p_full[t]) - prob(top))
                m = got["methods"][name]
                assert m["comprehensiveness"][f"{share:g}"] == pytest.approx(sum(comp) / 3, abs=1e-5), (name, share)
                assert m["sufficiency"][f"{share:g}"] == pytest.approx(sum(suff) / 3, abs=1e-5), (name, share)


def test_shared_prefill_scores_equal_own_prefill_for_every_cache_method(tiny) -> None:
    """share_prefill runs one prefill for all method:<spec> scorers; each one's scores equal those of its own
    prefill bit for bit, for every evicting cache method a plain prefill can score, at a realistic length."""
    from kvsieve.explain.scorer import SNAPSHOT, method_scores, share_prefill
    from kvsieve.methods import build, list_methods
    from kvsieve.snapshot import shareable

    model, tok = tiny
    ids = torch.randint(5, tok.vocab_size, (1, 302), generator=torch.Generator().manual_seed(2))
    specs = []
    for cls in list_methods("cache"):
        try:
            method = build(cls.name)
        except KVSieveError:  # needs arguments (wrappers, profiles): not in the default faithfulness list either
            continue
        if method.evicts and shareable(method) and method.kind == "evict":
            specs.append(cls.name)
    assert len(specs) > 20
    shared = Problem(model, tok, ids, n_prompt=300)
    share_prefill(shared, specs)
    assert SNAPSHOT in shared._cache
    own = Problem(model, tok, ids, n_prompt=300)
    for spec in specs:
        try:
            expected = method_scores(own, spec)
        except KVSieveError as err:  # e.g. finch without a question window: the shared path must refuse alike
            with pytest.raises(KVSieveError, match=re.escape(str(err)[:40])):
                method_scores(shared, spec)
            continue
        torch.testing.assert_close(method_scores(shared, spec), expected, rtol=0, atol=0, equal_nan=True, msg=spec)


def test_generated_target_and_outputs(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    result = kvsieve.explain(model, tok, PROMPT, method=["saliency", "fai"], max_new_tokens=3, faithfulness=True)
    assert result.generated and result.n_steps == 3
    json_path, html_path = result.write(tmp_path / "out", command="kvsieve explain ...")
    data = json.loads(json_path.read_text())
    assert data["methods"] == ["saliency", "fai"]
    assert [len(r) for r in data["scores"]["fai"]] == [result.n_prompt + t for t in range(3)]
    assert set(data["faithfulness"]["methods"]) == {"saliency", "fai", "random"}
    page = html_path.read_text()
    assert "<script" not in page.lower() and "://" not in page
    assert page.count('class="method"') == 2 * 3 and page.count("<details") == 3
    assert 'id="faithfulness"' in page


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"target": ""}, "the target is empty"),
        ({"target": " zzz"}, "cannot be tokenized"),
        ({"method": "bogus"}, "unknown attribution method"),
        ({"method": "method:full"}, "keeps every token"),
        ({"method": "method:quest"}, "keeps every token"),
        ({"method": "reagent(probes=3)"}, "no parameter 'probes'"),
        ({"method": []}, "no attribution method"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_input_is_one_line(tiny, kwargs, fragment) -> None:
    model, tok = tiny
    with pytest.raises(KVSieveError, match=fragment) as err:
        explain(model, tok, PROMPT, **{"target": " w20", **kwargs})
    assert "\n" not in str(err.value) and ";" in str(err.value)


def test_gradients_refused_without_autograd(tiny) -> None:
    model, tok = tiny
    with torch.inference_mode(), pytest.raises(KVSieveError, match="needs gradients"):
        explain(model, tok, PROMPT, target=" w20", method="saliency")
    with torch.inference_mode():
        explain(model, tok, PROMPT, target=" w20", method="attention_rollout")  # gradient-free methods still run


def test_prompt_beyond_the_window(tiny) -> None:
    model, tok = tiny
    long = " ".join(f"w{i % 90}" for i in range(4100))
    with pytest.raises(KVSieveError, match="beyond the model's window"):
        explain(model, tok, long, target=" w20", method="fai")


def test_cli_end_to_end_and_errors(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    model_dir = Path(tiny[0].config._name_or_path)
    out = tmp_path / "ex"
    argv = ["explain", "--model", str(model_dir), "--prompt", PROMPT, "--target", " w20 w21", "--raw",
            "--methods", "saliency,method:h2o,reagent(num_probes=2, max_steps=3)", "--faithfulness",
            "--shares", "0.5", "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["html"]).exists() and printed["faithfulness"]["shares"] == [0.5]

    from kvsieve import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for bad, fragment in (
        (["--target", " "], "--target is empty"),
        (["--methods", "nope"], "unknown attribution method"),
        (["--faithfulness", "--shares", "1.5"], "fractions in (0, 1)"),
    ):
        assert main(["explain", "--prompt", "hi", "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvsieve: error: ") and fragment in err and len(err.strip().splitlines()) == 1
