"""The embedded SmolLM2-135M model loads, converts once, and behaves as the rest of kvsieve assumes."""

from __future__ import annotations

import time

import torch

from kvsieve import models


def test_embedded_model_loads(smollm2) -> None:
    model, tokenizer = smollm2
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token is not None
    assert models.model_label(model.name_or_path) == "smollm2-135m"
    converted = models.converted_dir("smollm2-135m")
    assert (converted / "model.safetensors").is_file()
    assert (converted / "tokenizer.json").is_file()


def test_config_facts(smollm2) -> None:
    model, _ = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.head_dim == 64
    assert cfg.max_position_embeddings == 8192
    assert not hasattr(cfg, "quantization_config")


def test_second_load_uses_converted_dir(smollm2) -> None:
    start = time.perf_counter()
    model, tokenizer = models.load_model("smollm2-135m")
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"second load took {elapsed:.1f}s; the converted directory was not used"
    assert str(models.converted_dir("smollm2-135m")) in str(model.name_or_path)
    reference, _ = smollm2
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_greedy_generation_knows_paris(smollm2) -> None:
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_tokenizer_does_not_prepend_bos(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok("The capital of France is").input_ids
    assert ids == tok("The capital of France is", add_special_tokens=False).input_ids
    assert tok.bos_token_id not in ids
    assert tok.model_max_length == 8192
    assert tok.pad_token is not None
