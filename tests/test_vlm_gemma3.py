"""Gemma 3 multimodal on a tiny random-weight model (tests/tiny_vlms.py: SigLIP tower, 16 tokens per image, sliding
window 8 in layers 0 and 2, full attention in layers 1 and 3): the tokens of one image attend to each other in both
directions, also after pruning, and the sliding-window layers measure their window in original positions.

The shared VLM checks (keep 1.0 bitwise, kept rows computed and cached at their positions, generation, cache methods,
tags) run on Gemma 3 through tests/test_vlm.py and tests/test_vlm_methods2.py; here: references without kvsieve.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, UnsupportedModelError
from kvsieve.attention import sliding_allowed
from tiny_vlms import IMAGE_TOKEN, gemma3, supported_here

pytestmark = pytest.mark.skipif(
    not supported_here("gemma3"), reason="refused on this transformers (VLM_MIN_TRANSFORMERS)"
)

warnings.filterwarnings("ignore", category=FutureWarning)

WINDOW = 8


@pytest.fixture(scope="module")
def gemma():
    return gemma3(sliding_window=WINDOW)


def _logits(model, inputs, cache=None):
    with torch.no_grad():
        return model(**inputs, past_key_values=cache or DynamicCache(config=model.config)).logits


def test_full_is_bitwise_transformers_with_its_bidirectional_image_mask(gemma):
    model, make = gemma
    inputs = make(n_images=2)
    ref = _logits(model, inputs)
    causal = _logits(model, {k: v for k, v in inputs.items() if k != "token_type_ids"})
    assert not torch.allclose(ref, causal, atol=1e-4)  # the tiny model's output depends on the bidirectional mask
    for sieve in (Sieve("full"), Sieve("snapkv", budget=10_000), Sieve("full", prefill="dense")):
        with sieve.attach(model) as cache:
            assert torch.equal(_logits(model, inputs, cache), ref), sieve


def test_sliding_allowed_matches_a_loop():
    """Visibility of a sliding-window layer: (causal or same image) and within the window, from positions per row."""
    q_pos = torch.tensor([[3, 5, 6, 9, 10, 12]])
    k_pos = torch.cat([torch.tensor([[0, 1, 2]]), q_pos], dim=1)
    together = torch.tensor([[-1, 0, 0, 0, -1, 1]])
    got = sliding_allowed(q_pos, k_pos, 4, None, together)[0, 0]
    groups = [-1, -1, -1, *together[0].tolist()]
    for i, qp in enumerate(q_pos[0].tolist()):
        for j, kp in enumerate(k_pos[0].tolist()):
            same = together[0, i] >= 0 and groups[j] == together[0, i]
            assert bool(got[i, j]) == ((kp <= qp or same) and qp - kp < 4), (i, j)


def _masks(positions: torch.Tensor, groups: torch.Tensor) -> dict:
    """transformers-style 4D boolean masks for rows at ``positions`` (1D, sorted), ``groups`` their image (-1 none)."""
    causal = positions[None, :] <= positions[:, None]
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    full = causal | same
    sliding = full & ((positions[:, None] - positions[None, :]) < WINDOW)
    return {"full_attention": full[None, None], "sliding_attention": sliding[None, None]}


def _reference(model, inputs, kept: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The language model without kvsieve on the rows ``kept`` (then the tokens ``extra``, one each, at the next
    positions), with the masks above at the rows' original positions."""
    inner = model.model
    ids = inputs["input_ids"]
    with torch.no_grad():
        image = inner.get_image_features(inputs["pixel_values"])
        features = getattr(image, "pooler_output", image)
        embeds = inner.get_input_embeddings()(ids)
        mask = ids == IMAGE_TOKEN
        embeds[mask] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        groups = torch.where(mask[0], torch.cumsum(mask[0] & ~torch.roll(mask[0], 1), 0) - 1, -1)
        embeds, positions, groups = embeds[:, kept], kept, groups[kept]
        if extra is not None:
            n = ids.shape[1]
            embeds = torch.cat([embeds, inner.get_input_embeddings()(extra)], dim=1)
            positions = torch.cat([positions, torch.arange(n, n + extra.shape[1])])
            groups = torch.cat([groups, torch.full((extra.shape[1],), -1)])
        hidden = inner.language_model(
            inputs_embeds=embeds, position_ids=positions[None], attention_mask=_masks(positions, groups),
            cache=DynamicCache(config=model.config), use_cache=True,
        ).last_hidden_state  # fmt: skip
        return model.lm_head(hidden)


@pytest.mark.parametrize("spec", ["hiprune(keep=0.25)", "visionzip(keep=0.5, dominant=1.0)"])
def test_pre_llm_pruning_is_the_language_model_on_the_kept_rows_with_their_image_mask(gemma, spec):
    """After pre-LLM pruning, every layer attends as transformers would over the kept rows alone: the kept tokens of
    one image see each other in both directions, and a sliding-window layer's window spans original positions (a
    decoding step at position n sees the kept tokens within 8 positions, fewer than 8 tokens). visionzip with
    ``dominant=1.0`` merges nothing, so the rows are the model's own features."""
    model, make = gemma
    inputs = make(n_images=2, text_after=1)  # the second image ends within the window of the decoding step
    n = inputs["input_ids"].shape[1]
    with Sieve("full", sequence=spec).attach(model) as cache, torch.no_grad():
        prefill = model(**inputs, past_key_values=cache).logits
        kept = next(layer for layer in cache.layers if hasattr(layer, "segments")).segments[0].positions[0, 0].clone()
        step = prefill[:, -1:].argmax(-1)
        decoded = model(input_ids=step, position_ids=torch.tensor([[n]]), past_key_values=cache).logits
    assert kept.numel() < n and int((inputs["input_ids"][0, kept] == IMAGE_TOKEN).sum()) < 32
    reference = _reference(model, inputs, kept, step)
    torch.testing.assert_close(prefill, reference[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded[:, -1], reference[:, -1], rtol=1e-5, atol=1e-5)
    # the window by positions is not the window by count: the reference's decoding step differs from one that counts
    counted = _masks(torch.arange(kept.numel() + 1), torch.full((kept.numel() + 1,), -1))["sliding_attention"][0, 0, -1]
    by_position = _masks(torch.cat([kept, torch.tensor([n])]), torch.full((kept.numel() + 1,), -1))
    assert not torch.equal(counted, by_position["sliding_attention"][0, 0, -1])


def test_in_llm_pruning_keeps_the_image_mask_on_the_kept_rows(gemma):
    """FastV after layer 0: layers 1.. compute the kept rows only; the full-attention layer 1 attends over them with
    the kept tokens of one image seeing each other (compared with transformers' own sdpa over the kept rows)."""
    model, make = gemma
    inputs = make(n_images=2)
    seen = {}

    def take(module, args, kwargs):
        seen.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).clone())
        seen.setdefault("emb", kwargs["position_embeddings"])

    def take_out(module, args, output):
        seen.setdefault("out", (output[0] if isinstance(output, tuple) else output).clone())

    layer = model.model.language_model.layers[1]
    with Sieve("full", sequence="fastv(layer=0, keep=0.5)").attach(model) as cache, torch.no_grad():
        # registered after kvsieve's hooks: they see the rows kvsieve kept
        handles = [layer.register_forward_pre_hook(take, with_kwargs=True),
                   layer.self_attn.register_forward_hook(take_out)]  # fmt: skip
        try:
            model(**inputs, past_key_values=cache)
        finally:
            for h in handles:
                h.remove()
        kept = cache.layers[1].segments[0].positions[0, 0].clone()
    ids = inputs["input_ids"][0]
    assert seen["hidden"].shape[1] == kept.numel() < ids.numel()
    image = ids[kept] == IMAGE_TOKEN
    groups = torch.where(image, (torch.cumsum(ids == IMAGE_TOKEN, 0)[kept] - 1) // 16, -1)
    assert int(image.sum()) >= 2  # kept tokens of one image: the bidirectional part of the mask matters
    mask = _masks(kept, groups)["full_attention"]
    causal = _masks(kept, torch.full_like(groups, -1))["full_attention"]
    with torch.no_grad():
        ref = layer.self_attn(layer.input_layernorm(seen["hidden"]), seen["emb"], mask)[0]
        ref_causal = layer.self_attn(layer.input_layernorm(seen["hidden"]), seen["emb"], causal)[0]
    torch.testing.assert_close(seen["out"], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["out"], ref_causal, atol=1e-4)


def test_refusals_and_errors(gemma):
    model, make = gemma
    inputs = make(n_images=1)
    with (
        Sieve("full", prefill="xattention").attach(model) as cache,
        pytest.raises(UnsupportedModelError, match="both directions"),
    ):
        _logits(model, inputs, cache)
    with Sieve("full", prefill="xattention").attach(model) as cache:  # a text prompt is plain causal: fine
        _logits(model, {"input_ids": inputs["input_ids"][:, :5]}, cache)
    with (
        Sieve("full", sequence="vtc_cls(keep=0.5)").attach(model) as cache,
        pytest.raises(UnsupportedModelError, match=r"no \[CLS\]"),
    ):
        _logits(model, inputs, cache)
    n = inputs["input_ids"].shape[1]
    with Sieve("full", sequence="fopru(keep=0.25)").attach(model) as cache, torch.no_grad():
        model(**inputs, past_key_values=cache)
        # a decoding step given a position inside the pruned prompt would sit before the kept tokens: refused
        with pytest.raises(KVSieveError, match="original positions"):
            model(input_ids=inputs["input_ids"][:, -1:], position_ids=torch.tensor([[n - 5]]), past_key_values=cache)
    assert n > cache.kv_tokens()[1]


def test_generation_end_to_end(gemma):
    model, make = gemma
    inputs = make(n_images=1)
    n = inputs["input_ids"].shape[1]
    for spec in ("hiprune(keep=0.25)", "fastv(layer=1, keep=0.5)"):
        with Sieve("full", sequence=spec).attach(model) as cache, torch.no_grad():
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, n + 4)
        assert cache.kv_tokens()[-1] < n + 3 and cache.kv_tokens()[0] == WINDOW - 1  # full layer pruned, window held


def test_adapter_groups_are_the_projectors_pooling_windows(gemma):
    """Each image token's encoder patches (what statistics are averaged over) are the patches Gemma 3's projector
    averages into it: pooling the patch indices with the projector's own pool gives the groups' mean index."""
    from kvsieve import build
    from kvsieve.vision import adapter_for

    model, _ = gemma
    adapter = adapter_for(model, build("hiprune"))
    projector = model.model.multi_modal_projector
    p = projector.patches_per_image
    units, grids = adapter.units(torch.zeros(2, 16, 64), None)
    assert len(units) == 2 and grids == [(4, 4), (4, 4)]
    pooled = projector.avg_pool(torch.arange(p * p, dtype=torch.float32).view(1, 1, p, p)).flatten()
    assert torch.equal(adapter.groups[0].float().mean(dim=1), pooled)
    assert sorted(adapter.groups[0].flatten().tolist()) == list(range(p * p))  # every patch in exactly one token


def test_load_model_and_processor_from_a_local_directory(tmp_path):
    """A Gemma 3 directory (weights, tokenizer with its image tokens, processor) loads as an image-text-to-text model;
    its processor turns an image and a prompt into inputs (with token_type_ids) that generate through a pruning
    sieve."""
    from PIL import Image
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    from kvsieve.models import load_model, load_processor, load_tokenizer

    special = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.add_special_tokens({"additional_special_tokens": list(special.values())})
    tokenizer.save_pretrained(tmp_path)
    tokenizer = type(tokenizer).from_pretrained(tmp_path, extra_special_tokens=special)
    ids = tuple(tokenizer.convert_tokens_to_ids(list(special.values())))
    model, _ = gemma3(vocab=len(tokenizer), tokens=ids)
    model.save_pretrained(tmp_path)
    images = Gemma3ImageProcessor(size={"height": 64, "width": 64})
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16).save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert type(loaded).__name__ == "Gemma3ForConditionalGeneration"
    processor = load_processor(tmp_path)
    inputs = processor(images=Image.new("RGB", (40, 40), (200, 30, 30)), text="<start_of_image> What colour is it?",
                       return_tensors="pt")  # fmt: skip
    n = inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == ids[1]).sum()) == 16 and int(inputs["token_type_ids"].sum()) == 16
    with Sieve("full", sequence="hiprune(keep=0.25)").attach(loaded) as cache, torch.no_grad():
        out = loaded.generate(**inputs, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, n + 2) and cache.kv_tokens()[1] == n - 12 + 1  # 4 of 16 image tokens, + one step
