"""Tiny random-weight models built from configs (no downloads) for the unit tests."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _build(cls, config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def make_model(arch: str, max_positions: int = 4096) -> torch.nn.Module:
    """A 2-layer model of ``arch`` with GQA (4 query heads, 2 KV heads; Gemma3: 1 KV head and sliding layers)."""
    if arch == "llama":
        cfg = LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=max_positions)
        return _build(LlamaForCausalLM, cfg)
    if arch == "qwen2":
        cfg = Qwen2Config(**COMMON, num_key_value_heads=2, max_position_embeddings=max_positions)
        return _build(Qwen2ForCausalLM, cfg)
    if arch == "mistral":
        cfg = MistralConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=max_positions, sliding_window=None)
        return _build(MistralForCausalLM, cfg)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 4},
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=max_positions,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
        return _build(Gemma3ForCausalLM, cfg)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gemma3"]


def prompt_ids(n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch, n), generator=gen)
