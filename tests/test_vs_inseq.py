"""benchmarks/vs_inseq.py's own parts (no inseq needed): the rank correlation, the prompt/target alignment, the
uniform ReAGent replacer, and the integrated-gradients baseline it passes to kvsieve."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kvsieve.explain.gradients import integrated_gradients
from kvsieve.explain.problem import Problem
from kvsieve.explain.reagent import ReagentConfig, _proposals, reagent
from kvsieve.models import load_model
from tiny_model_dir import save_tiny_model_dir

_spec = importlib.util.spec_from_file_location("vs_inseq", Path(__file__).parent.parent / "benchmarks" / "vs_inseq.py")
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    return load_model(save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def problem(tiny) -> Problem:
    model, tok = tiny
    ids = tok("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", return_tensors="pt").input_ids
    return Problem(model, tok, ids, n_prompt=ids.shape[1] - 2, seed=1)


def test_rankdata_gives_ties_their_average_rank() -> None:
    assert vs.rankdata(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert vs.rankdata(np.array([3.0, 3.0, 3.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_by_hand() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert vs.spearman(x, x**3) == pytest.approx(1.0)
    assert vs.spearman(x, -x) == pytest.approx(-1.0)
    # one swapped pair of five: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 120
    assert vs.spearman(x, np.array([1.0, 2.0, 3.0, 5.0, 4.0])) == pytest.approx(0.9)
    # ties: Pearson of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    assert vs.spearman(np.array([1.0, 2.0, 2.0, 3.0]), x[:4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert math.isnan(vs.spearman(np.ones(4), x[:4]))


def test_per_step_spearman_reads_each_step_context_only() -> None:
    ours = [[1.0, 2.0, 3.0, None], [1.0, 2.0, 3.0, 4.0]]
    theirs = [[1.0, 2.0, 3.0, None], [4.0, 3.0, 2.0, 1.0]]
    assert vs.per_step_spearman(ours, theirs, n_prompt=3) == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError):
        vs.per_step_spearman(ours, theirs[:1], n_prompt=3)
    mean, low, count = vs.summarize([1.0, float("nan"), 0.5])
    assert (mean, low, count) == (0.75, 0.5, 2)


def test_a_token_scored_nan_is_not_compared() -> None:
    """inseq's ReAGent scores a target token NaN (None in the log) when none of its probes stopped: no correlation,
    not a perfect one (NaNs all rank apart, so two NaN rows would otherwise correlate 1.0)."""
    x = np.array([1.0, 2.0, 3.0])
    assert math.isnan(vs.spearman(x, np.array([np.nan, 2.0, 1.0])))
    nans = [[None, None, None]]
    assert math.isnan(vs.per_step_spearman(nans, nans, n_prompt=3)[0])
    assert math.isnan(vs.per_step_spearman([[1.0, 2.0, 3.0]], nans, n_prompt=3)[0])


def test_table_counts_the_tokens_compared_and_the_probes_that_stopped() -> None:
    header = {
        "examples": 2, "length": 200, "steps": 1, "tasks": ["qa"], "methods": ["reagent_uniform"], "seeds": [0, 1],
        "reagent": {**vs.REAGENT, "max_steps": 300}, "ig_steps": 50, "reagent_max_tokens": 96, "threads": 2,
        "inseq": "0.7.1",
    }  # fmt: skip
    row = {"method": "reagent_uniform", "seconds_ours": 2.0, "seconds_inseq": 1.0, "probes": 16}
    rows = [
        {**row, "rho": [0.5], "iterations_ours": [40], "iterations_inseq": [60], "stopped_ours": [16],
         "stopped_inseq": [16], "rho_inseq_ab": [0.4], "rho_ours_ab": [0.6]},
        {**row, "rho": [float("nan")], "iterations_ours": [300], "iterations_inseq": [300], "stopped_ours": [4],
         "stopped_inseq": [0], "rho_inseq_ab": [float("nan")], "rho_ours_ab": [0.2]},
    ]  # fmt: skip
    line = next(x for x in vs.table(rows, header).splitlines() if x.startswith("| reagent_uniform"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["2", "1 of 2", "0.5000"]  # the NaN token is left out of the mean
    assert cells[5:7] == ["0.400 / 0.400", "0.400 / 0.200"]
    assert cells[-1] == "170 / 180 (62% / 50% stopped)"  # medians of 40, 300 and 60, 300; 20 and 16 of 32 probes


def test_same_tokens_allows_only_the_pad_tokens_inseq_hides() -> None:
    ids = [5, 2, 7, 8, 2, 9, 4]  # pad token 2 twice in the prompt (6 tokens), target 4
    assert vs.same_tokens(ids, ids, 2, 6)
    assert vs.same_tokens(ids, [5, 7, 8, 9, 4], 2, 6)
    assert not vs.same_tokens(ids, [5, 7, 8, 9], 2, 6)  # another sequence
    assert not vs.same_tokens([5, 7, 2], [5, 7], 2, 2)  # a hidden target token: not comparable


def test_align_splits_prompt_and_target_at_a_token_boundary(tiny) -> None:
    _, tok = tiny
    prompt, full, ids, n_prompt = vs.align(tok, "w1 w2 w3", " w4 w5 w6", steps=2)
    assert full == "w1 w2 w3 w4 w5"  # the longest target prefix of at most 2 tokens
    assert ids == tok(full).input_ids
    assert ids[:n_prompt] == tok(prompt).input_ids
    assert len(ids) - n_prompt == 2
    assert vs.align(tok, "w1 w2 w3", "", steps=2) is None  # no target token


@pytest.mark.integration
def test_align_moves_a_leading_space_token_to_the_prompt() -> None:
    """SmolLM2 tokenizes " 1138" as " ", "1", "1", "3", "8": with one step, the space joins the prompt."""
    from kvsieve.models import load_tokenizer

    tok = load_tokenizer()
    prompt, full, ids, n_prompt = vs.align(tok, "It was signed in the year", " 1138", steps=1)
    assert prompt == "It was signed in the year " and full == "It was signed in the year 1"
    assert ids == tok(full).input_ids and ids[:n_prompt] == tok(prompt).input_ids and len(ids) == n_prompt + 1


def test_uniform_replacer_proposes_every_other_token_equally(problem) -> None:
    vocab = problem.model.get_output_embeddings().weight.shape[0]
    replacer = vs.UniformReplacer(vocab)
    probs = _proposals(replacer, problem.ids[:, :5], vocab)
    for i in range(5):
        assert probs[i, problem.ids[0, i]] == 0
        others = probs[i][probs[i] > 0]
        assert others.numel() == vocab - 1
        torch.testing.assert_close(others, torch.full_like(others, 1 / (vocab - 1)))
    scores, _ = reagent(problem, replacer=replacer, config=ReagentConfig(num_probes=2, max_steps=3))
    assert torch.isfinite(scores[0, : problem.n_prompt]).all()


def test_integrated_gradients_baseline(problem) -> None:
    model = problem.model
    embeds = model.get_input_embeddings()(problem.ids[0]).detach()
    # no baseline = the zero baseline, bitwise
    assert torch.equal(
        integrated_gradients(problem, n_steps=4).nan_to_num(),
        integrated_gradients(problem, n_steps=4, baseline=torch.zeros_like(embeds)).nan_to_num(),
    )
    # the baseline equal to the input: nothing to attribute
    assert integrated_gradients(problem, n_steps=2, baseline=embeds).nan_to_num().abs().max() == 0
    # one Gauss-Legendre node (alpha 0.5, weight 1): the gradient at the midpoint times (input - baseline)
    base = model.get_input_embeddings()(torch.zeros_like(problem.ids[0])).detach()
    got = integrated_gradients(problem, n_steps=1, baseline=base)
    for t in range(problem.n_steps):
        n = problem.n_prompt + t
        x = (base[:n] + 0.5 * (embeds[:n] - base[:n]))[None].requires_grad_(True)
        p = model(inputs_embeds=x, use_cache=False).logits[0, -1].float().softmax(-1)[problem.targets[t]]
        (g,) = torch.autograd.grad(p, x)
        want = (g[0] * (embeds[:n] - base[:n])).norm(dim=-1).double()
        torch.testing.assert_close(got[t, :n], want, rtol=1e-4, atol=1e-9)
