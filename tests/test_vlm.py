"""Vision-language models: kvsieve on tiny random-weight LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Idefics3 and Gemma 3.

Every sequence method at keep 1.0 is bitwise the unpruned model; pruned passes compute and cache exactly the kept
rows at their original positions (M-RoPE included); generation runs through ``model.generate``; bad input is refused.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, UnsupportedModelError, list_methods
from kvsieve.cache import SieveLayer
from kvsieve.sequence import stream_modality
from kvsieve.vision import ADAPTERS, VisionPruner
from tiny_vlms import VLMS, llava, make_vlm

warnings.filterwarnings("ignore", category=FutureWarning)

FULL = {  # every sequence method at its neutral setting
    "aim": "aim(layer=1, keep=1.0, merge=1.0)",
    "todre": "todre(keep=1.0, relevant=1.0)",
    "gsearch": "gsearch(layer=1, keep=1.0)",
    "psigmoid": "psigmoid(layer=1, keep=1.0)",
    "transprune": "transprune(layer=0, keep=1.0)",
}
PRUNED = {  # every sequence method pruning the tiny models
    "aim": "aim(layer=1, keep=0.25, merge=0.5)",
    "todre": "todre(keep=0.5, layer=1, relevant=0.5, drop_layer=2)",
    "gsearch": "gsearch(schedule=((0, 0.75), (2, 0.25)))",
    "psigmoid": "psigmoid(layer=0, keep=0.25)",
    "transprune": "transprune(layer=0, keep=0.25)",
    "fastv": "fastv(layer=1, keep=0.5)",
}


def _specs(table: dict, default: str) -> list[str]:
    return [table.get(c.name, default.format(c.name)) for c in list_methods("sequence")]


def _prelm(spec: str) -> bool:
    from kvsieve import build

    method = build(spec)
    return isinstance(method, VisionPruner) or any(s.after < 0 for s in method.stages(4))


def _run(model, cache, inputs, steps=2):
    out = []
    with torch.no_grad():
        logits = model(**inputs, past_key_values=cache).logits[:, -1]
        out.append(logits)
        for _ in range(steps):
            logits = model(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
            out.append(logits)
    return out


@pytest.fixture(scope="module", params=VLMS)
def vlm(request):
    return request.param, *make_vlm(request.param)


def test_full_is_bitwise_the_model(vlm):
    _, model, make = vlm
    inputs = make(n_images=2)
    ref = _run(model, DynamicCache(config=model.config), inputs)
    with Sieve("full").attach(model) as cache:
        assert all(torch.equal(a, b) for a, b in zip(ref, _run(model, cache, inputs), strict=True))
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is never rerouted


def test_every_sequence_method_keeping_everything_is_bitwise_the_model(vlm):
    arch, model, make = vlm
    inputs = make(n_images=2)
    ref = _run(model, DynamicCache(config=model.config), inputs)
    hooks_before = _hooks(model)
    for spec in _specs(FULL, "{}(keep=1.0)"):
        if _prelm(spec) and arch not in ADAPTERS:
            with (
                pytest.raises(UnsupportedModelError, match="before the LLM"),
                Sieve("full", sequence=spec).attach(model),
            ):
                pass
            continue
        with Sieve("full", sequence=spec).attach(model) as cache:
            got = _run(model, cache, inputs)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), spec
    assert _hooks(model) == hooks_before  # kvsieve's hooks are gone with the block


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _layer_rows(model, spec, inputs):
    """Rows each decoder layer computed at the prompt, cache sizes, and the rotary embeddings layers received."""
    from kvsieve.sequence import decoder_layers

    rows, embs = {}, {}

    def record(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows.setdefault(i, hidden.shape[1])
            embs.setdefault(i, kwargs["position_embeddings"])

        return hook

    with Sieve("full", sequence=spec).attach(model) as cache, torch.no_grad():
        handles = [m.register_forward_pre_hook(record(i), with_kwargs=True) for i, m in decoder_layers(model)]
        try:
            logits = model(**inputs, past_key_values=cache).logits
        finally:
            for h in handles:
                h.remove()
        positions = {i: layer.segments[0].positions[0, 0].clone() for i, layer in enumerate(cache.layers)
                     if isinstance(layer, SieveLayer)}  # fmt: skip
        return rows, embs, positions, cache.kv_tokens(), logits


def _holds(model, i: int, rows: int) -> int:
    """Tokens decoder layer ``i`` holds after computing ``rows`` rows: all of them, or on a sliding-window layer
    (Gemma 3) the last ``window - 1`` (transformers' own sliding cache layer)."""
    text = model.config.get_text_config()
    sliding = (getattr(text, "layer_types", None) or ["full_attention"] * (i + 1))[i] == "sliding_attention"
    return min(rows, text.sliding_window - 1) if sliding else rows


def test_pruned_layers_compute_and_cache_exactly_the_kept_tokens_at_their_positions(vlm):
    arch, model, make = vlm
    inputs = make(n_images=2)
    n = inputs["input_ids"].shape[1]
    _, full_embs, _, _, _ = _layer_rows(model, "fastv(keep=1.0)", inputs)
    image = int((inputs["input_ids"] == 100).sum())
    for spec in _specs(PRUNED, "{}(keep=0.5)"):
        if (_prelm(spec) and arch not in ADAPTERS) or (spec.startswith("vtc_cls") and arch != "llava"):
            continue
        rows, embs, positions, held, logits = _layer_rows(model, spec, inputs)
        assert logits.shape[1] == rows[max(rows)]
        for i in rows:
            assert held[i] == _holds(model, i, rows[i]), (spec, i)  # computed rows == cached tokens
            if i not in positions:  # a sliding-window layer: transformers' cache layer, no positions kept
                continue
            assert rows[i] == positions[i].numel(), (spec, i)
            kept = positions[i]
            assert bool((kept[1:] > kept[:-1]).all()) and int(kept[-1]) == n - 1  # in order; the last token stays
            cos, sin = embs[i]
            ref_cos, ref_sin = full_embs[i]
            # original (M-)RoPE; the token axis is the one before the last ((B, n, D), or (3, B, n, D) per section)
            assert torch.equal(cos, ref_cos.index_select(-2, kept)) and torch.equal(sin, ref_sin.index_select(-2, kept))
        assert min(rows.values()) < n, spec
        assert n - min(rows.values()) <= image, spec  # only image tokens were dropped


def test_generation_end_to_end(vlm):
    arch, model, make = vlm
    inputs = make(n_images=1)
    n = inputs["input_ids"].shape[1]
    spec = "visionzip(keep=0.5)" if arch in ADAPTERS else "fastv(layer=1, keep=0.5)"
    with Sieve("full", sequence=spec).attach(model) as cache, torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, n + 4)
    assert cache.kv_tokens()[-1] < n + 3  # the prompt was pruned


def test_direct_decoding_after_pruning_continues_at_the_original_positions(vlm):
    """A plain ``model(...)`` loop (no position_ids, as the bench decodes) equals ``model.generate``, which tracks
    positions itself: after pre-LLM pruning the cache's stream length still counts the dropped prompt tokens."""
    arch, model, make = vlm
    inputs = make(n_images=1)
    spec = "visionzip(keep=0.5)" if arch in ADAPTERS else "fastv(layer=1, keep=0.5)"
    with torch.no_grad():
        with Sieve("full", sequence=spec).attach(model) as cache:
            ref = model.generate(**inputs, past_key_values=cache, max_new_tokens=3, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True).logits  # fmt: skip
        with Sieve("full", sequence=spec).attach(model) as cache:
            got = _run(model, cache, inputs, steps=2)
            assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 2
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_vl", "gemma3"])
def test_vlms_newer_than_the_installed_transformers_are_refused_in_one_line(arch, monkeypatch):
    import transformers

    from kvsieve.sieve import VLM_MIN_TRANSFORMERS

    model, _ = make_vlm(arch)
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    with pytest.raises(UnsupportedModelError, match=f"from transformers {VLM_MIN_TRANSFORMERS[arch]} on") as err:
        Sieve("full").attach(model).__enter__()
    assert "\n" not in str(err.value) and "pip install -U" in str(err.value)


def test_cache_methods_run_on_vlms(vlm):
    _, model, make = vlm
    inputs = make(n_images=1)
    n = inputs["input_ids"].shape[1]
    with Sieve("snapkv", compression=0.5).attach(model) as cache:
        _run(model, cache, inputs, steps=2)
    layers = model.config.get_text_config().num_hidden_layers
    # sliding-window layers (Gemma 3) are not compressed: they hold their window
    expected = [n // 2 + 2 if _holds(model, i, n) == n else _holds(model, i, n + 2) for i in range(layers)]
    assert cache.kv_tokens() == expected


def test_tokens_are_tagged_with_modality_and_image(vlm):
    from kvsieve.sequence import PASS, STREAM_TAGS

    _, model, make = vlm
    inputs = make(n_images=2)
    with Sieve("full", sequence="fastv(keep=1.0)").attach(model) as cache, torch.no_grad():
        model(**inputs, past_key_values=cache)
        tags = cache.pass_state[PASS].tokens
        stream = cache.shared[STREAM_TAGS]
    image = inputs["input_ids"] == 100
    assert torch.equal(tags.modality.bool(), image) and torch.equal(stream.bool(), image)
    assert set(tags.segment[image].tolist()) >= {0, 1} and bool((tags.segment[~image] == -1).all())
    # what a cache method reads for the tokens it holds (positions, -1 for empty slots; later ones are text)
    held = SimpleNamespace(shared=cache.shared, positions=torch.tensor([[[0, 6, 5, -1, stream.shape[1] + 3]]]))
    expected = [int(stream[0, 0]), int(stream[0, 6]), int(stream[0, 5]), int(stream[0, 0]), 0]
    assert stream_modality(held)[0, 0].tolist() == expected


def test_bad_input_is_refused_before_any_work():
    model, make = make_vlm("llava")
    text_only = {"input_ids": make()["input_ids"][:, :5]}
    with (
        Sieve("full", sequence="visionzip(keep=0.5)").attach(model) as cache,
        pytest.raises(KVSieveError, match="none"),
    ):
        model(**text_only, past_key_values=cache)
    with (
        Sieve("full", sequence="fastv(scope='image')").attach(model) as cache,
        pytest.raises(KVSieveError, match="none"),
    ):
        model(**text_only, past_key_values=cache)
    with (
        pytest.raises(KVSieveError, match="leaves no decoder layer"),
        Sieve("full", sequence="fastv(layer=3)").attach(model),
    ):
        pass
    with pytest.raises(KVSieveError, match=r"keep must be > 0\.0"):
        Sieve("full", sequence="hiprune(keep=0.0)")
    from kvsieve import build
    from kvsieve.vision import adapter_for

    unknown = SimpleNamespace(config=SimpleNamespace(model_type="some_vlm", vision_config=object()))
    with pytest.raises(UnsupportedModelError, match="before the LLM"):  # a VLM with no pre-LLM adapter
        adapter_for(unknown, build("hiprune"))
    qwen2, make_q = make_vlm("qwen2_vl")
    with (
        pytest.raises(UnsupportedModelError, match=r"no \[CLS\]"),
        Sieve("full", sequence="vtc_cls").attach(qwen2) as cache,
    ):
        qwen2(**make_q(), past_key_values=cache)


def test_an_unsupported_vlm_is_refused_in_one_line_naming_the_supported_ones():
    from kvsieve.sieve import SUPPORTED_VLM_TYPES, check_model

    assert {"qwen3_vl", "gemma3"} <= set(SUPPORTED_VLM_TYPES)
    for kind in ("paligemma", "qwen3_vl_moe"):
        text = SimpleNamespace(model_type="gemma")
        fake = SimpleNamespace(config=SimpleNamespace(model_type=kind, vision_config=object(),
                                                      get_text_config=lambda text=text: text))  # fmt: skip
        with pytest.raises(UnsupportedModelError) as err:
            check_model(fake)
        message = str(err.value)
        assert "\n" not in message and f"unsupported vision-language architecture {kind!r}" in message
        assert all(t in message for t in SUPPORTED_VLM_TYPES)


def test_load_model_and_processor_from_a_local_directory(tmp_path):
    """A VLM directory (weights, tokenizer, processor) loads as an image-text-to-text model; its processor turns an
    image and a prompt into inputs that generate through a pruning sieve."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    from kvsieve.models import load_model, load_processor, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    model, _ = llava(vocab=len(tokenizer), image_token=image_token)
    model.save_pretrained(tmp_path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(tmp_path)  # fmt: skip
    loaded, _ = load_model(tmp_path)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    processor = load_processor(tmp_path)
    inputs = processor(images=Image.new("RGB", (40, 40), (200, 30, 30)), text="<image> What colour is it?",
                       return_tensors="pt")  # fmt: skip
    n = inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == image_token).sum()) == 16
    with Sieve("full", sequence="visionzip(keep=0.25)").attach(loaded) as cache, torch.no_grad():
        out = loaded.generate(**inputs, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, n + 2) and cache.kv_tokens()[0] == n - 12 + 1  # 4 of 16 image tokens, + one step
    with pytest.raises(KVSieveError, match="text model"):
        load_processor("smollm2-135m")


def test_images_only_compresses_image_tokens_and_keeps_the_text(vlm):
    _, model, make = vlm
    inputs = make(n_images=2)
    ids = inputs["input_ids"][0]
    text = int((ids != 100).sum())
    with Sieve("images_only:snapkv(window=4)", budget=text + 3).attach(model) as cache, torch.no_grad():
        model(**inputs, past_key_values=cache)
        for layer in cache.sieve_layers():
            for head in layer.segments[0].positions[0]:  # (T,) stream positions held by one head
                assert head.numel() == text + 3 and int((ids[head] == 100).sum()) == 3  # every text token stayed
    plain = ids[ids != 100][None]
    with Sieve("images_only:snapkv(window=4)", compression=0.5).attach(model) as cache, torch.no_grad():
        model(input_ids=plain, past_key_values=cache)  # no image: plain snapkv
        held = [layer.segments[0].positions.clone() for layer in cache.sieve_layers()]
    with Sieve("snapkv(window=4)", compression=0.5).attach(model) as cache, torch.no_grad():
        model(input_ids=plain, past_key_values=cache)
        assert all(torch.equal(a, b.segments[0].positions) for a, b in zip(held, cache.sieve_layers(), strict=True))
