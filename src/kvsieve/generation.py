"""Prefill (optionally in chunks, so peak KV memory stays at budget + chunk) and greedy generation with timing."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .cache import SieveCache
from .compat import cache_kwargs
from .errors import ContextLengthError, KVSieveError
from .reconstruction import post_prefill_method
from .sieve import Sieve


@dataclass
class GenerationResult:
    """What one generation did: the text, what the cache held afterwards, and how long it took."""

    text: str
    new_token_ids: list[int]
    prompt_tokens: int
    kv_tokens: list[int | list[int]]  # per layer; a list per KV head where heads differ
    kv_bytes: int  # bytes of key and value tensors held at the end
    prefill_seconds: float
    decode_seconds_per_token: float
    method: str
    budget: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: SieveCache,
    *,
    chunk_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """Run the prompt through the model into ``cache``; returns the last position's logits ``(B, vocab)``.

    ``chunk_size``: feed the prompt this many tokens at a time; each chunk is compressed before the next one, so the
    cache never holds more than budget + chunk tokens. None feeds the whole prompt at once.

    A method that needs the model after the prefill (``kvzip``: it has the model repeat the context; see
    :mod:`kvsieve.reconstruction`) gets the whole prompt without eviction (chunks included), then runs its passes and
    compresses once; ``tokenizer`` writes its prompts.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise KVSieveError("input_ids must be a non-empty (batch, tokens) tensor of token ids")
    n = input_ids.shape[1]
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise KVSieveError(f"chunk_size must be a whole number of tokens >= 1, got {chunk_size!r}")
    step = n if chunk_size is None else chunk_size
    session = getattr(cache, "session", None)
    post = post_prefill_method(session.method) if session is not None else None
    if post is not None and session.evicts and cache.compressing:
        with cache.paused():
            logits = _feed(model, input_ids, cache, step, attention_mask)
        post.after_prefill(model, cache, input_ids, tokenizer)
        return logits
    return _feed(model, input_ids, cache, step, attention_mask)


def _feed(model, input_ids: torch.Tensor, cache: SieveCache, step: int, attention_mask) -> torch.Tensor:
    """Forward passes of ``step`` tokens; the last position's logits."""
    n = input_ids.shape[1]
    past = attention_mask[:, :0] if attention_mask is not None else None
    logits = None
    for start in range(0, n, step):
        chunk = input_ids[:, start : start + step]
        kwargs = {}
        if attention_mask is not None:
            past = torch.cat([past, attention_mask[:, start : start + step]], dim=1)
            kwargs["attention_mask"] = past
            kwargs["position_ids"] = _positions_from_mask(past)[:, -chunk.shape[1] :]
        out = model(input_ids=chunk, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache), **kwargs)
        logits = out.logits[:, -1]
    return logits


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids with left padding skipped, as transformers' generate computes them."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str | torch.Tensor,
    sieve: Sieve,
    *,
    max_new_tokens: int = 64,
    chunk_size: int | None = None,
    chat: bool = False,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Greedy generation of one prompt with ``sieve``'s method and budget; times prefill and each decode step.

    ``chat``: wrap a string prompt in the tokenizer's chat template (for instruct models).
    """
    if not isinstance(sieve, Sieve):
        raise KVSieveError(f"sieve must be a kvsieve.Sieve, got {type(sieve).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KVSieveError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if isinstance(prompt, str) and not prompt.strip():
        raise KVSieveError("the prompt is empty; give some text to continue")
    if not isinstance(prompt, (str, torch.Tensor)):
        raise KVSieveError(f"prompt must be a string or a tensor of token ids, got {type(prompt).__name__}")
    if isinstance(prompt, str):
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids
    else:
        input_ids = prompt if prompt.ndim == 2 else prompt[None]
    if input_ids.shape[0] != 1:
        raise KVSieveError("kvsieve.generate takes one prompt; run model.generate inside sieve.attach for batches")
    input_ids = input_ids.to(model.device)
    check_prompt_fits(model, sieve, input_ids.shape[1] + max_new_tokens)
    eos = set(_as_list(getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id))

    with sieve.attach(model) as cache:
        t0 = time.perf_counter()
        logits = prefill(model, input_ids, cache, chunk_size=chunk_size, tokenizer=tokenizer)
        prefill_seconds = time.perf_counter() - t0
        new_ids: list[int] = []
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            next_id = int(logits[0].argmax())
            new_ids.append(next_id)
            if stop_at_eos and next_id in eos:
                break
            if len(new_ids) == max_new_tokens:
                break
            step = torch.tensor([[next_id]], device=model.device)
            out = model(input_ids=step, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            logits = out.logits[:, -1]
        decode_steps = max(1, len(new_ids) - 1)  # the first token comes from the prefill logits
        decode_seconds = (time.perf_counter() - t1) / decode_steps
        return GenerationResult(
            text=tokenizer.decode(new_ids, skip_special_tokens=True),
            new_token_ids=new_ids,
            prompt_tokens=int(input_ids.shape[1]),
            kv_tokens=cache.kv_tokens(),
            kv_bytes=cache.kv_bytes(),
            prefill_seconds=prefill_seconds,
            decode_seconds_per_token=decode_seconds,
            method=sieve.method.spec(),
            budget=str(sieve.budget or "full"),
        )


def check_prompt_fits(model: torch.nn.Module, sieve: Sieve, total_tokens: int) -> None:
    """ContextLengthError, before any compute, if a non-streaming method would run past the model's window."""
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if window is not None and total_tokens > window and not sieve.method.streams:
        raise ContextLengthError(
            f"prompt plus new tokens ({total_tokens}) exceed the model's window of {window} tokens, and "
            f"{sieve.method.name} keeps original positions. Shorten the prompt, or use a streaming method such as "
            "streaming_llm, which re-indexes positions within the cache."
        )


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [int(x)]
