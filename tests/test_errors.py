"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvsieve import (
    BudgetError,
    ContextLengthError,
    KVSieveError,
    Sieve,
    UnknownMethodError,
    UnsupportedModelError,
    build,
)
from kvsieve.cli import main
from kvsieve.generation import check_prompt_fits
from tiny_models import make_model, prompt_ids


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_compression_outside_unit_interval(ratio):
    with pytest.raises(BudgetError, match=r"outside \[0, 1\)"):
        Sieve("snapkv", compression=ratio)


@pytest.mark.parametrize("budget", [0, -5, 2.5])
def test_bad_token_budget(budget):
    with pytest.raises(BudgetError, match="budget"):
        Sieve("snapkv", budget=budget)


@pytest.mark.parametrize("spec", ["quest(read_budget=0)", "quest(read_budget=2.5)", "tidaldecode(read_budget=-0.5)"])
def test_bad_read_budget(spec):
    with pytest.raises(BudgetError, match="read"):
        Sieve(spec)


def test_budget_smaller_than_the_sinks():
    with pytest.raises(BudgetError, match="smaller than streaming_llm's 4 sink tokens"):
        Sieve("streaming_llm", budget=4)
    Sieve("streaming_llm", budget=5)  # sinks plus one recent token fits


def test_budget_smaller_than_the_sinks_at_run_time_with_a_ratio():
    model = make_model("llama")
    with (
        Sieve("streaming_llm(n_sink=8)", compression=0.9).attach(model) as cache,
        pytest.raises(BudgetError, match="sink"),
    ):
        model(prompt_ids(40), past_key_values=cache)


def test_method_needs_a_budget_and_full_refuses_one():
    with pytest.raises(BudgetError, match="needs a budget"):
        Sieve("snapkv")
    with pytest.raises(BudgetError, match="keeps every token"):
        Sieve("full", compression=0.5)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UnknownMethodError, match=r"unknown method 'snapkvv'.*snapkv"):
        build("snapkvv")
    with pytest.raises(KVSieveError, match="cannot parse"):
        build("snapkv(window=)")
    with pytest.raises(KVSieveError, match="snapkv has no hyperparameter 'windw'; its fields: window, kernel, pooling"):
        build("snapkv(windw=3)")


def test_unsupported_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with (
        pytest.raises(UnsupportedModelError, match=r"unsupported architecture 'gpt2'.*llama"),
        Sieve("full").attach(model),
    ):
        pass


def test_prompt_beyond_the_window_with_a_non_streaming_method():
    model = make_model("llama", max_positions=64)
    ids = prompt_ids(80)
    with pytest.raises(ContextLengthError, match=r"window of 64 tokens.*streaming"):
        check_prompt_fits(model, Sieve("snapkv", compression=0.5), 80)
    with Sieve("snapkv", compression=0.5).attach(model) as cache, pytest.raises(ContextLengthError, match="64"):
        model(ids, past_key_values=cache)
    # a streaming method re-indexes positions, so it runs past the window
    with Sieve("streaming_llm", budget=32).attach(model) as cache, torch.no_grad():
        for start in range(0, 80, 16):
            model(ids[:, start : start + 16], past_key_values=cache)
    assert cache.kv_tokens() == [32, 32]


def test_output_attentions_is_refused():
    model = make_model("llama")
    with (
        Sieve("snapkv", compression=0.5).attach(model) as cache,
        pytest.raises(UnsupportedModelError, match="output_attentions"),
    ):
        model(prompt_ids(10), past_key_values=cache, output_attentions=True)


def test_rerotation_refuses_sliding_window_models():
    with (
        pytest.raises(UnsupportedModelError, match="rerotate=False"),
        Sieve("streaming_llm", budget=8).attach(make_model("gemma3")),
    ):
        pass


def test_adakv_refuses_rerotation():
    with pytest.raises(KVSieveError, match="rerotate=False"):
        build("adakv:streaming_llm")


def test_cli_reports_errors_without_a_traceback(capsys):
    assert main(["generate", "--method", "snapkv", "--compression", "1.2", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "kvsieve: error:" in err and "outside [0, 1)" in err
    assert main(["generate", "--method", "nope", "--budget", "8", "--prompt", "hi"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_cli_usage_errors_are_one_line_too(capsys):
    """argparse's own errors (a missing or malformed argument) use kvsieve's one-line form and exit code 2."""
    for argv, fragment in (
        (["generate"], "one of the arguments --prompt --prompt-file is required"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens: must be at least 1"),
        (["generate", "--prompt", "hi", "--compression", "half"], "--compression"),
        (["no-such-command"], "invalid choice"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("kvsieve: error: ") and fragment in err, err
        assert "--help" in err  # the fix: where the usage is


def test_diagnose_checks_map_heads_before_the_forward_pass():
    from kvsieve.diagnose.diagnosis import diagnose

    model = make_model("llama")
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(KVSieveError, match=r"head 2\.0 does not exist: the model has 2 layers x 4 query heads"):
            diagnose(model, prompt_ids(40), map_heads=[(1, 3), (2, 0)])
    finally:
        handle.remove()
    assert calls == []


def test_masked_heads_names_the_valid_range():
    from kvsieve.diagnose import masked_heads

    with (
        pytest.raises(KVSieveError, match=r"heads 0\.4, 5\.0 do not exist.*layer 0-1 and head 0-3"),
        masked_heads(make_model("llama"), [(0, 4), (5, 0), (1, 1)]),
    ):
        pass
