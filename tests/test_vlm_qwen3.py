"""Qwen3-VL's DeepStack under token pruning, on a tiny random-weight Qwen3-VL (tests/tiny_vlms.py: DeepStack
features from encoder blocks 0 and 1, added to the image tokens after decoder layers 0 and 1).

The shared VLM checks (keep 1.0 bitwise, exactly the kept rows computed and cached at their M-RoPE positions,
generation, cache methods, tags) run on Qwen3-VL through tests/test_vlm.py, tests/test_vlm_methods2.py and
tests/test_vlm_qwen25.py; here: the DeepStack add after pruning, against references computed without kvsieve.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from kvsieve import Sieve, UnsupportedModelError
from kvsieve.deepstack import kept_features
from kvsieve.sequence import decoder_layers
from test_vlm import _run
from tiny_vlms import IMAGE_TOKEN, qwen3_vl, supported_here

pytestmark = pytest.mark.skipif(
    not supported_here("qwen3_vl"), reason="refused on this transformers (VLM_MIN_TRANSFORMERS)"
)

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def qwen3():
    return qwen3_vl()


def _deepstack_reference(model, inputs) -> list[torch.Tensor]:
    """Per DeepStack level, the features ``(V, D)`` of the prompt's image tokens, straight from the vision tower."""
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return [torch.cat(list(level)) for level in out.deepstack_features]


def test_kept_features_match_a_loop_over_the_kept_rows():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 12, generator=gen) < 0.5
    embeds = torch.randn(int(mask.sum()), 3, generator=gen)
    rows = torch.stack([torch.tensor([0, 2, 3, 5, 8, 11]), torch.tensor([1, 2, 4, 6, 7, 11])])
    got_mask, got = kept_features(mask, embeds, rows)
    expected, feature = [], 0
    for b in range(2):
        for j in range(12):
            if mask[b, j]:
                if j in rows[b].tolist():
                    expected.append(embeds[feature])
                feature += 1
    assert torch.equal(got_mask, mask.gather(1, rows))
    assert torch.equal(got, torch.stack(expected))


@pytest.mark.parametrize("spec", ["hiprune(keep=0.25)", "fastv(layer=0, keep=0.5)", "visionzip(keep=0.5)"])
def test_deepstack_adds_its_features_to_exactly_the_kept_image_rows(qwen3, spec):
    """Between decoder layer ``i``'s output and layer ``i + 1``'s input (before kvsieve's hook) the hidden states
    change by the DeepStack feature of level ``i`` on the kept image rows, each the feature of its own original image
    token, and by nothing elsewhere. Pre-LLM (hiprune, visionzip with merged rows) and in-LLM pruning after layer 0,
    below the last DeepStack layer (fastv)."""
    model, make = qwen3
    inputs = make(n_images=2)
    ids = inputs["input_ids"][0]
    features = _deepstack_reference(model, inputs)
    assert len(features) == 2
    visual_index = torch.cumsum(ids == IMAGE_TOKEN, 0) - 1  # each image token's feature row
    layers = dict(decoder_layers(model))
    outputs, inputs_of = {}, {}

    def take_output(i):
        def hook(module, args, output):
            outputs.setdefault(i, output.clone())

        return hook

    def take_input(i):
        def hook(module, args, kwargs):
            inputs_of.setdefault(i, (args[0] if args else kwargs["hidden_states"]).clone())

        return hook

    handles = [layers[i].register_forward_hook(take_output(i)) for i in (0, 1)]
    handles += [layers[i].register_forward_pre_hook(take_input(i), with_kwargs=True, prepend=True) for i in (1, 2)]
    try:
        with Sieve("full", sequence=spec).attach(model) as cache, torch.no_grad():
            model(**inputs, past_key_values=cache)
            kept = [layer.segments[0].positions[0, 0].clone() for layer in cache.sieve_layers()]
    finally:
        for h in handles:
            h.remove()
    assert kept[1].numel() < ids.numel()  # rows were dropped before the second DeepStack add
    for level in (0, 1):
        out, rows = outputs[level][0], kept[level]
        assert out.shape[0] == rows.numel()
        image = ids[rows] == IMAGE_TOKEN
        expected = out.clone()
        expected[image] = out[image] + features[level][visual_index[rows[image]]]
        assert torch.equal(inputs_of[level + 1][0], expected), (spec, level)


def test_pre_llm_pruning_is_the_language_model_run_on_the_kept_rows(qwen3):
    """A manual reference without kvsieve: the language model run (with transformers' own attention and cache) on the
    kept rows' embeddings, their original M-RoPE positions and their own DeepStack features gives the logits of the
    pruned run."""
    model, make = qwen3
    inputs = make(n_images=2)
    ids = inputs["input_ids"]
    with Sieve("full", sequence="hiprune(keep=0.25)").attach(model) as cache, torch.no_grad():
        pruned = model(**inputs, past_key_values=cache).logits
        kept = cache.sieve_layers()[0].segments[0].positions[0, 0].clone()
    inner = model.model
    with torch.no_grad():
        image = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        embeds = inner.get_input_embeddings()(ids)
        mask = ids == IMAGE_TOKEN
        embeds[mask] = torch.cat(list(image.pooler_output))
        positions, _ = inner.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"],
                                            mm_token_type_ids=inputs["mm_token_type_ids"])  # fmt: skip
        deepstack = [torch.cat(list(level)) for level in image.deepstack_features]
        own = (torch.cumsum(mask[0], 0) - 1)[kept][mask[0, kept]]  # each kept image token's feature row
        kept_mask, kept_deepstack = mask[:, kept], [f[own] for f in deepstack]
        hidden = inner.language_model(
            inputs_embeds=embeds[:, kept], position_ids=positions[:, :, kept], cache=DynamicCache(config=model.config),
            use_cache=True, visual_pos_masks=kept_mask, deepstack_visual_embeds=kept_deepstack,
        ).last_hidden_state  # fmt: skip
        reference = model.lm_head(hidden)
    assert kept.numel() == ids.shape[1] - 2 * 12  # 4 of 16 tokens per image
    assert pruned.shape == reference.shape
    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-5)


def test_the_override_is_the_models_own_function_outside_the_block(qwen3):
    model, make = qwen3
    text = model.model.language_model
    inputs = make(n_images=1)
    ref = _run(model, DynamicCache(config=model.config), inputs)
    sieve = Sieve("full", sequence="fastv(layer=0, keep=0.5)")
    with sieve.attach(model):
        assert "_deepstack_process" in vars(text)
        with Sieve("snapkv", compression=0.5).attach(model):  # nested: the inner block restores the outer override
            inner = vars(text)["_deepstack_process"]
        assert vars(text)["_deepstack_process"] is not inner
    assert "_deepstack_process" not in vars(text)
    with pytest.raises(RuntimeError, match="boom"), sieve.attach(model):
        raise RuntimeError("boom")
    assert "_deepstack_process" not in vars(text)
    got = _run(model, DynamicCache(config=model.config), inputs)  # the model alone is the model again
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


def test_deepstack_rows_kvsieve_did_not_keep_are_refused(qwen3):
    """The override refuses hidden states whose rows it has no record of (e.g. a text model called directly with a
    shortened sequence inside the block) instead of adding features to the wrong rows."""
    model, _ = qwen3
    text = model.model.language_model
    with (
        Sieve("full", sequence="fastv(layer=0, keep=0.5)").attach(model),
        pytest.raises(UnsupportedModelError, match="DeepStack"),
    ):
        text._deepstack_process(torch.zeros(1, 3, 64), torch.ones(1, 5, dtype=torch.bool), torch.zeros(5, 64))


def test_load_model_from_a_local_directory(tmp_path):
    """A saved Qwen3-VL directory loads as an image-text-to-text model that prunes; its processor needs torchvision
    (Qwen3-VL's video processor), and without it load_processor says so in one line."""
    from transformers import Qwen2VLImageProcessor

    from kvsieve import KVSieveError
    from kvsieve.models import load_model, load_processor, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    special = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    ids = tuple(tokenizer.convert_tokens_to_ids(special))
    model, _ = qwen3_vl(vocab=len(tokenizer), tokens=ids)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessor(patch_size=4, temporal_patch_size=2, merge_size=2).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text('{"processor_class": "Qwen3VLProcessor"}')
    loaded, _ = load_model(tmp_path)
    assert type(loaded).__name__ == "Qwen3VLForConditionalGeneration"
    text = [3, 4, 5]
    input_ids = torch.tensor([text + [ids[2]] + [ids[0]] * 16 + [ids[3]] + text])
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == ids[0]).int(),
              "pixel_values": torch.randn(64, 96, generator=gen),
              "image_grid_thw": torch.tensor([[1, 8, 8]])}  # fmt: skip
    with Sieve("full", sequence="visionzip(keep=0.25)").attach(loaded) as cache, torch.no_grad():
        out = loaded.generate(**inputs, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, input_ids.shape[1] + 2) and cache.kv_tokens()[0] == input_ids.shape[1] - 12 + 1
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the missing-package error cannot be shown")
    with pytest.raises(KVSieveError, match=r"needs a package that is not installed.*pip install torchvision") as err:
        load_processor(tmp_path)
    assert "\n" not in str(err.value)
