"""Tiny random-weight vision-language models built from configs (no downloads) for the VLM unit tests.

Each builder returns ``(model, make_inputs)``: ``make_inputs(n_images=1, text_before=5, text_after=6, seed=0)`` gives
the keyword arguments of one forward pass (``input_ids`` with the image placeholder tokens where the model's own
processor would put them, ``pixel_values`` and the per-architecture extras), so no processor is needed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from kvsieve.sieve import transformers_needed

VOCAB = 128
IMAGE_TOKEN = 100
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)  # fmt: skip


def _build(cls, config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def _text_ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 90, (n,), generator=gen).tolist()


def _ids(pieces: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[t for p in pieces for t in p]], dtype=torch.long)


def llava(vocab: int = VOCAB, image_token: int = IMAGE_TOKEN) -> tuple[torch.nn.Module, Callable]:
    """LLaVA-1.5 layout: CLIP tower (CLS + 16 patches, feature layer -2, CLS dropped), 2-layer MLP projector.
    ``vocab``/``image_token``: to pair the model with a real tokenizer (``make_inputs`` uses the defaults)."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**{**TEXT, "vocab_size": vocab}),
                         image_token_id=image_token, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")  # fmt: skip
    model = _build(LlavaForConditionalGeneration, config)

    def make_inputs(n_images: int = 1, text_before: int = 5, text_after: int = 6, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        pieces = [_text_ids(gen, text_before)]
        for _ in range(n_images):
            pieces += [[IMAGE_TOKEN] * 16, _text_ids(gen, 2)]
        pieces.append(_text_ids(gen, text_after))
        return {"input_ids": _ids(pieces), "pixel_values": torch.randn(n_images, 3, 32, 32, generator=gen)}

    return model, make_inputs


def llava_next() -> tuple[torch.nn.Module, Callable]:
    """LLaVA-NeXT AnyRes: a base image plus crops on a 2x2 grid, unpadded, with a newline token per row."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)  # fmt: skip
    config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
                             image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
                             vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    model = _build(LlavaNextForConditionalGeneration, config)

    def make_inputs(n_images: int = 1, text_before: int = 5, text_after: int = 6, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        # a 64x64 image: best grid 2x2 crops of 32 -> 8x8 patches, no unpadding; + 8 newlines; + 16 base tokens
        per_image = 16 + 8 * 8 + 8
        pieces = [_text_ids(gen, text_before)]
        for _ in range(n_images):
            pieces += [[IMAGE_TOKEN] * per_image, _text_ids(gen, 2)]
        pieces.append(_text_ids(gen, text_after))
        return {
            "input_ids": _ids(pieces),
            "pixel_values": torch.randn(n_images, 5, 3, 32, 32, generator=gen),
            "image_sizes": torch.tensor([[64, 64]] * n_images),
        }

    return model, make_inputs


def _qwen(cls, config_cls, vocab: int = VOCAB, tokens: tuple[int, int, int, int] | None = None,
          vision_base: dict | None = None, text_extra: dict | None = None,
          **vision_extra) -> tuple[torch.nn.Module, Callable]:  # fmt: skip
    """``vocab``/``tokens`` (image, video, vision start, vision end ids): to pair the model with a real tokenizer
    (``make_inputs`` uses the defaults). ``vision_base``: replaces the Qwen2-VL vision fields; ``text_extra``: more
    language-model fields."""
    image, video, start, end = tokens or (IMAGE_TOKEN, 101, 102, 103)
    text = {**TEXT, "vocab_size": vocab,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            **(text_extra or {})}  # fmt: skip
    vision = vision_base or dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4)
    vision = dict(**vision, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  **vision_extra)  # fmt: skip
    config = config_cls(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                        vision_start_token_id=start, vision_end_token_id=end, bos_token_id=1,
                        eos_token_id=2)  # fmt: skip
    model = _build(cls, config)

    def make_inputs(n_images: int = 1, text_before: int = 5, text_after: int = 6, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        grid = (1, 8, 8)  # 8x8 patches of 4 pixels -> 16 tokens after the 2x2 merge
        pieces = [_text_ids(gen, text_before)]
        for _ in range(n_images):
            pieces += [[102], [IMAGE_TOKEN] * 16, [103], _text_ids(gen, 2)]
        pieces.append(_text_ids(gen, text_after))
        patch = 3 * 2 * 4 * 4
        ids = _ids(pieces)
        inputs = {
            "input_ids": ids,
            "pixel_values": torch.randn(n_images * 64, patch, generator=gen),
            "image_grid_thw": torch.tensor([grid] * n_images),
        }
        if "mm_token_type_ids" in inspect.signature(cls.forward).parameters:  # newer releases' processors return it
            inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()  # image 1, text 0
        return inputs

    return model, make_inputs


def qwen2_vl(vocab: int = VOCAB, tokens: tuple[int, int, int, int] | None = None) -> tuple[torch.nn.Module, Callable]:
    """Qwen2-VL: ViT with 2D RoPE, 2x2 patch merger, M-RoPE (temporal/height/width) positions in the LLM."""
    return _qwen(Qwen2VLForConditionalGeneration, Qwen2VLConfig, vocab, tokens)


def qwen2_5_vl(window_size: int = 16, fullatt_block_indexes: tuple[int, ...] = (1,),
               depth: int = 2) -> tuple[torch.nn.Module, Callable]:  # fmt: skip
    """Qwen2.5-VL: windowed attention in the ViT (full attention in the listed blocks), M-RoPE in the LLM.

    The default ``window_size`` 16 (pixels) is 2 x 2 merged tokens: the 4 x 4 merged tokens of an 8 x 8-patch image
    fall into windows of up to 4 tokens, so the tower's window order differs from the image's row-major order. A
    ``window_size`` of 64 or more puts each image in one window (the window order is then the original order)."""
    return _qwen(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, VOCAB, None,
                 dict(depth=depth, hidden_size=64, num_heads=4), intermediate_size=48, out_hidden_size=64,
                 window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes))  # fmt: skip


def qwen3_vl(deepstack: tuple[int, ...] = (0, 1), vocab: int = VOCAB,
             tokens: tuple[int, int, int, int] | None = None) -> tuple[torch.nn.Module, Callable]:  # fmt: skip
    """Qwen3-VL: a ViT without window attention (learned position embeddings, 2D RoPE), DeepStack mergers at the
    encoder blocks ``deepstack`` (their features are added to the image tokens after decoder layers 0, 1, ...) and
    interleaved M-RoPE in the LLM (head_dim 16: the sections 2 + 3 + 3 fill its 8 frequencies). ``vocab``/``tokens``:
    as for :func:`_qwen`."""
    return _qwen(Qwen3VLForConditionalGeneration, Qwen3VLConfig, vocab, tokens,
                 dict(depth=2, hidden_size=32, num_heads=4), intermediate_size=48, out_hidden_size=64,
                 num_position_embeddings=64, deepstack_visual_indexes=list(deepstack),
                 text_extra={"head_dim": 16})  # fmt: skip


def idefics3() -> tuple[torch.nn.Module, Callable]:
    """Idefics3 / SmolVLM: SigLIP-style tower without [CLS], pixel shuffle (scale 2) and a linear connector."""
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **TEXT), image_token_id=IMAGE_TOKEN, scale_factor=2,
    )  # fmt: skip
    model = _build(Idefics3ForConditionalGeneration, config)

    def make_inputs(n_images: int = 1, text_before: int = 5, text_after: int = 6, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        pieces = [_text_ids(gen, text_before)]
        for _ in range(n_images):  # 4x4 patches -> 4 tokens after the 2x2 pixel shuffle
            pieces += [[104], [IMAGE_TOKEN] * 4, [104], _text_ids(gen, 2)]
        pieces.append(_text_ids(gen, text_after))
        return {"input_ids": _ids(pieces), "pixel_values": torch.randn(1, n_images, 3, 32, 32, generator=gen)}

    return model, make_inputs


def gemma3(sliding_window: int = 8, vocab: int = VOCAB,
           tokens: tuple[int, int, int] | None = None) -> tuple[torch.nn.Module, Callable]:  # fmt: skip
    """Gemma 3 multimodal: SigLIP tower (no [CLS], 8 x 8 patches), a projector averaging 2 x 2 patches into 16 tokens,
    a language model with sliding-window layers (window ``sliding_window``, shorter than the prompts) and full layers,
    and image tokens that attend to each other in both directions (``token_type_ids``: 1 for image tokens).
    ``vocab``/``tokens`` (begin-of-image, image, end-of-image ids): to pair the model with a real tokenizer
    (``make_inputs`` uses the defaults)."""
    boi, image, eoi = tokens or (102, IMAGE_TOKEN, 103)
    text = dict(TEXT, vocab_size=vocab, head_dim=16, sliding_window=sliding_window,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])  # fmt: skip
    config = Gemma3Config(
        text_config=text, mm_tokens_per_image=16, image_token_index=image, boi_token_index=boi,
        eoi_token_index=eoi,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8),
    )  # fmt: skip
    model = _build(Gemma3ForConditionalGeneration, config)

    def make_inputs(n_images: int = 1, text_before: int = 5, text_after: int = 6, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        pieces = [_text_ids(gen, text_before)]
        for _ in range(n_images):
            pieces += [[102], [IMAGE_TOKEN] * 16, [103], _text_ids(gen, 2)]
        pieces.append(_text_ids(gen, text_after))
        ids = _ids(pieces)
        return {"input_ids": ids, "pixel_values": torch.randn(n_images, 3, 64, 64, generator=gen),
                "token_type_ids": (ids == IMAGE_TOKEN).long()}  # fmt: skip

    return model, make_inputs


def supported_here(arch: str) -> bool:
    """Whether the installed transformers is recent enough for kvsieve's support of ``arch`` (``VLM_MIN_TRANSFORMERS``;
    on older releases kvsieve refuses the model, tested in test_vlm.py)."""
    return transformers_needed(arch) is None


BUILDERS = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl,
            "qwen3_vl": qwen3_vl, "idefics3": idefics3, "gemma3": gemma3}  # fmt: skip
VLMS = [arch for arch in BUILDERS if supported_here(arch)]  # Qwen3-VL and Gemma 3 need a recent transformers


def make_vlm(arch: str) -> tuple[torch.nn.Module, Callable]:
    return BUILDERS[arch]()
