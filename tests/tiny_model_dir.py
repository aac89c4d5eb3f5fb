"""A tiny model saved as a Hugging Face model directory (config.json, weights, a word-level tokenizer with a chat
template), built offline, so the CLI and the loaders can be run end to end without the embedded model."""

from __future__ import annotations

from pathlib import Path

from tiny_models import make_model

WORDS = [f"w{i}" for i in range(90)]  # ids 3..92; the tiny models' vocabulary is 96


def save_tiny_model_dir(path: Path, *, tokenizer: bool = True) -> Path:
    """Write a 2-layer Llama (4 query heads, 2 KV heads, window 4096) and, with ``tokenizer``, its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    make_model("llama").save_pretrained(path)
    if tokenizer:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        fast.chat_template = (
            "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} w0{% endif %}"
        )
        fast.save_pretrained(path)
    return path
