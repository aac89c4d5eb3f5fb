"""Issue-5 methods on the embedded SmolLM2-135M: answers stay sensible, bytes held are what the methods promise.

"Sensible" is measured by teacher forcing the full cache's greedy answer ("The capital of France is Paris.") through
the compressed cache: the fraction of answer tokens the compressed cache also predicts first, and their mean negative
log-likelihood (SmolLM2-135M is small: 2-bit codes cost it a token or two; 4-bit codes cost nothing here).
"""

from __future__ import annotations

import torch

from kvsieve import Sieve, prefill
from kvsieve.methods.kivi import kivi_nbytes
from kvsieve.methods.zipcache import zipcache_nbytes

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "ocean", "piano"]
CONTEXT = " ".join(f"Fact {i}: the code word for item {i} is {w}." for i, w in enumerate(WORDS * 3))
QUESTION = CONTEXT + " Question: What is the capital of France? Answer in one word."
ANSWER = "The capital of France is Paris."


def _question_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return prompt, tokenizer(ANSWER, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def answer_fit(model, tokenizer, sieve: Sieve) -> tuple[float, float]:
    """(top-1 agreement, mean NLL) of the reference answer, teacher-forced after the question."""
    prompt, answer = _question_ids(tokenizer)
    with sieve.attach(model) as cache:
        logits = [prefill(model, prompt, cache)]
        for i in range(answer.shape[1] - 1):
            step = model(input_ids=answer[:, i : i + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits.append(step.logits[:, -1])
    logp = torch.stack(logits, dim=1).log_softmax(dim=-1)[0]
    agreement = float((logp.argmax(dim=-1) == answer[0]).float().mean())
    return agreement, float(-logp.gather(1, answer[0][:, None]).mean())


def test_the_reference_answer_is_the_full_caches_own(smollm2):
    agreement, nll = answer_fit(*smollm2, Sieve("full"))
    assert agreement == 1.0 and nll < 0.5


def test_zipcache_after_snapkv_keeps_the_answer_and_holds_the_promised_bytes(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    n = ids.shape[1]
    with Sieve("zipcache:snapkv", compression=0.5).attach(model) as cache:
        prefill(model, ids, cache)
    kept = n // 2  # snapkv keeps half; zipcache quantises all of it, 4-bit on the salient half of each head
    high = round(kept * 0.5)
    per_layer = zipcache_nbytes(0, KV_HEADS * high, KV_HEADS * (kept - high), HEAD_DIM, 4, 2, 4, KV_HEADS)
    assert cache.kv_tokens() == [kept] * LAYERS
    assert cache.kv_bytes() == LAYERS * per_layer
    full = n * LAYERS * KV_HEADS * HEAD_DIM * 2 * 4
    assert cache.kv_bytes() < 0.06 * full  # half the tokens at about 3 bits instead of 32

    agreement, nll = answer_fit(model, tokenizer, Sieve("zipcache:snapkv", compression=0.5))
    assert agreement >= 0.8 and nll < 1.0


def test_kivi_4bit_keeps_the_answer_and_holds_the_promised_bytes(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    with Sieve("kivi(bits=4)").attach(model) as cache:
        prefill(model, ids, cache)
    assert cache.kv_bytes() == LAYERS * kivi_nbytes(ids.shape[1], KV_HEADS, HEAD_DIM, 4, 32, 128, 4)
    agreement, nll = answer_fit(model, tokenizer, Sieve("kivi(bits=4):snapkv", compression=0.5))
    assert agreement == 1.0 and nll < 0.5


def test_minicache_shares_layer_pairs_from_the_middle(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    with Sieve("minicache(gamma=0.5)").attach(model) as cache:
        logits = prefill(model, ids, cache)
    assert torch.isfinite(logits).all()
    layers = cache.sieve_layers()
    for idx in range(15, 29, 2):  # pairs (15, 16), ..., (27, 28)
        shallow, deep = layers[idx].segments[0], layers[idx + 1].segments[0]
        assert shallow.pair is deep.pair and deep.owner and not shallow.owner
    assert getattr(layers[14].segments[0], "pair", None) is None
    full = ids.shape[1] * LAYERS * KV_HEADS * HEAD_DIM * 2 * 4
    assert cache.kv_bytes() < 0.95 * full
