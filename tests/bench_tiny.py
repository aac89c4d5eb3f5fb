"""A tiny random-weight Llama with the embedded SmolLM2 tokenizer's vocabulary, so the bench's real tasks run on it.

``TinyLoader`` is picklable and importable by Ray workers (tests put this folder on their PYTHONPATH).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_model(vocab_size: int, max_positions: int = 4096) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


@dataclass
class TinyLoader:
    """``loader(device) -> (model, tokenizer)`` for Ray workers; ``pid_dir``: each load writes its pid there;
    ``delay``: seconds added to every forward pass, so a unit lasts long enough to be killed in the middle."""

    pid_dir: str | None = None
    delay: float = 0.0

    def __call__(self, device: str = "cpu"):
        from kvsieve.models import load_tokenizer

        torch.set_num_threads(1)
        tokenizer = load_tokenizer("smollm2-135m")
        model = tiny_model(len(tokenizer)).to(device)
        if self.delay:
            model.register_forward_pre_hook(lambda *_: time.sleep(self.delay))
        if self.pid_dir:
            Path(self.pid_dir, f"{os.getpid()}.pid").write_text(str(os.getpid()))
        return model, tokenizer
