"""Pre-LLM pruning on a tiny random-weight Qwen2.5-VL (window attention in the vision tower, M-RoPE in the LLM) and
Qwen3-VL (no window attention, DeepStack features added in the LLM; its own checks: tests/test_vlm_qwen3.py).

The tiny Qwen2.5-VL tower (tests/tiny_vlms.py) has a windowed block and a full-attention block, and windows of 2 x 2
merged tokens, so its window order differs from the image's order: a statistic or a merged row put in the wrong order
would move onto another token. The tests taking the ``qwen`` fixture run on both models.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, UnsupportedModelError, build, list_methods
from kvsieve.sequence import decoder_layers
from kvsieve.vision import ADAPTERS, VisionPruner, adapter_for
from test_vlm import _layer_rows, _run
from tiny_vlms import IMAGE_TOKEN, qwen2_5_vl, qwen3_vl, supported_here

warnings.filterwarnings("ignore", category=FutureWarning)

PRE_LLM = sorted(c.name for c in list_methods("sequence") if issubclass(build(c.name).__class__, VisionPruner))
NEEDS_CLS = {"vtc_cls"}  # Qwen2.5-VL's tower has no [CLS]
PRUNING = [m for m in PRE_LLM if m not in NEEDS_CLS]
TOKENS = 16  # image tokens per tiny image (8 x 8 patches merged 2 x 2)


def _spec(method: str, keep: float) -> str:
    return f"todre(keep={keep}, relevant=1.0)" if method == "todre" else f"{method}(keep={keep})"


@pytest.fixture(scope="module", params=[a for a in ("qwen2_5_vl", "qwen3_vl") if supported_here(a)])
def qwen(request):
    return qwen2_5_vl() if request.param == "qwen2_5_vl" else qwen3_vl()


def test_every_pre_llm_method_is_registered_for_the_test():
    assert {"fopru", "hiprune", "visionzip", "todre", "flowcut", "vflowopt", "globalcom2"} <= set(PRUNING)
    assert {"qwen2_5_vl", "qwen3_vl"} <= set(ADAPTERS)


@pytest.mark.parametrize("method", PRE_LLM)
def test_keep_1_is_bitwise_the_unpruned_model(qwen, method):
    model, make = qwen
    inputs = make(n_images=2)
    ref = _run(model, DynamicCache(config=model.config), inputs)
    with Sieve("full", sequence=_spec(method, 1.0)).attach(model) as cache:
        got = _run(model, cache, inputs)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


@pytest.mark.parametrize("method", PRUNING)
def test_exactly_the_kept_image_tokens_reach_every_layer_at_their_m_rope_positions(qwen, method):
    model, make = qwen
    inputs = make(n_images=2)
    ids = inputs["input_ids"][0]
    n = ids.numel()
    _, full_embs, _, _, _ = _layer_rows(model, "fastv(keep=1.0)", inputs)
    layers = model.config.get_text_config().num_hidden_layers
    for keep in (0.5, 0.25):
        rows, embs, positions, held, logits = _layer_rows(model, _spec(method, keep), inputs)
        kept_image = 2 * max(1, int(TOKENS * keep))
        expected = n - (2 * TOKENS - kept_image)
        assert len(rows) == layers and set(rows.values()) == {expected}, (method, keep, rows)
        assert held == [expected] * layers and logits.shape[1] == expected  # the cache holds exactly them
        for i in range(layers):
            kept = positions[i]
            assert kept.numel() == expected and bool((kept[1:] > kept[:-1]).all())
            assert int((ids[kept] == IMAGE_TOKEN).sum()) == kept_image
            assert int((ids[kept] != IMAGE_TOKEN).sum()) == int((ids != IMAGE_TOKEN).sum())  # all text stays
            cos, sin = embs[i]
            ref_cos, ref_sin = full_embs[i]
            assert torch.equal(cos, ref_cos.index_select(-2, kept)) and torch.equal(sin, ref_sin.index_select(-2, kept))


def test_kept_tokens_keep_their_original_m_rope_position_ids(qwen):
    """The rotary embedding every layer applies to the kept rows is the one of the kept tokens' own 3-D (temporal,
    height, width) position ids in the unpruned prompt: nothing is renumbered after the dropped image tokens."""
    model, make = qwen
    inputs = make(n_images=2)
    with torch.no_grad():
        extra = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}
        full, _ = model.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], **extra)
    _, embs, positions, _, _ = _layer_rows(model, "hiprune(keep=0.25)", inputs)
    rotary = model.model.language_model.rotary_emb
    for i, kept in positions.items():
        assert kept.numel() == inputs["input_ids"].shape[1] - 2 * (TOKENS - 4)
        ids = full[:, :, kept]
        assert bool((ids[1:, 0, 1:] != ids[1:, 0, :-1] + 1).any())  # kept image tokens skip grid positions
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=embs[i][0].dtype), ids)
        assert torch.equal(embs[i][0], cos) and torch.equal(embs[i][1], sin)


def _spy(monkeypatch, cls):
    seen = []
    original = cls.select_vision

    def spy(self, view):
        choice = original(self, view)
        seen.append((view, choice))
        return choice

    monkeypatch.setattr(cls, "select_vision", spy)
    return seen


def test_statistics_are_in_the_original_patch_order(monkeypatch):
    """With its full-attention block first, the tower's statistics cannot depend on its window size: one window per
    image (window order = original order) and 2 x 2-token windows must give the same per-token statistics."""
    from kvsieve.methods.visionzip import VisionZip

    views = []
    for window in (16, 64):
        model, make = qwen2_5_vl(window_size=window, fullatt_block_indexes=(0,))
        seen = _spy(monkeypatch, VisionZip)
        with Sieve("full", sequence="visionzip(keep=0.5)").attach(model) as cache, torch.no_grad():
            model(**make(n_images=2), past_key_values=cache)
        ((view, _),) = seen
        views.append(view)
    windowed, whole = views
    assert not torch.equal(windowed.adapter.window_index, torch.arange(32))  # the windows reorder the tokens
    assert torch.equal(whole.adapter.window_index, torch.arange(32))
    assert windowed.source_layers(range(2)) == [0]  # the windowed block 1 is read at the full-attention block 0
    for u in range(2):
        assert torch.allclose(windowed.attention(0)[u], whole.attention(0)[u], atol=1e-6)
        assert torch.allclose(windowed.keys(0)[u], whole.keys(0)[u], atol=1e-5)
        assert torch.allclose(windowed.attention(1)[u], whole.attention(0)[u], atol=1e-6)
    grid = windowed.grid(0)
    assert grid == (4, 4)


def test_rows_the_method_sees_and_writes_are_the_llm_image_tokens(qwen, monkeypatch):
    """The features shown to the method are the image tokens in the LLM's order, and a merged row written at token
    ``j`` reaches the LLM as image token ``j`` (the merger's window order is undone by the model after the hook)."""
    from kvsieve.methods.visionzip import VisionZip

    model, make = qwen
    inputs = make(n_images=2)
    with torch.no_grad():
        embeds = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    embeds = torch.cat(list(getattr(embeds, "pooler_output", embeds)))
    seen = _spy(monkeypatch, VisionZip)
    hidden = {}

    def record(module, args, kwargs):  # runs before kvsieve's own hook: the embeddings of the whole prompt
        hidden.setdefault("x", (args[0] if args else kwargs["hidden_states"]).clone())

    (_, first), *_ = decoder_layers(model)
    handle = first.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    try:
        _layer_rows(model, "visionzip(keep=0.5, dominant=0.5)", inputs)
    finally:
        handle.remove()
    ((view, choice),) = seen
    assert torch.equal(torch.cat(view.features), embeds)
    image_positions = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten().tolist()
    merged_rows = 0
    for u in range(2):
        targets, feats = choice.merged[u]
        merged = {int(j): f for j, f in zip(targets, feats, strict=True)}
        for j in range(TOKENS):
            expected = merged.get(j, view.features[u][j])
            assert torch.equal(hidden["x"][0, image_positions[u * TOKENS + j]], expected.to(hidden["x"].dtype))
        merged_rows += len(merged)
    assert merged_rows > 0


@pytest.mark.parametrize("method", PRUNING)
def test_generation_end_to_end(qwen, method):
    model, make = qwen
    inputs = make(n_images=1)
    n = inputs["input_ids"].shape[1]
    with Sieve("full", sequence=_spec(method, 0.25)).attach(model) as cache, torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, n + 4)
    assert cache.kv_tokens()[-1] == n - (TOKENS - 4) + 3  # 4 of 16 image tokens; 3 decoded tokens cached


def test_refusals():
    model, make = qwen2_5_vl()
    with (
        pytest.raises(UnsupportedModelError, match=r"no \[CLS\]"),
        Sieve("full", sequence="vtc_cls(keep=0.5)").attach(model) as cache,
    ):
        model(**make(), past_key_values=cache)
    no_full, make = qwen2_5_vl(fullatt_block_indexes=())
    for method in PRUNING:  # refused when attached, before any work, unless it reads no encoder attention
        if method == "todre":
            continue
        with (
            pytest.raises(UnsupportedModelError, match=r"no full-attention block.*use todre"),
            Sieve("full", sequence=_spec(method, 0.5)).attach(no_full),
        ):
            pass
    inputs = make()
    with Sieve("full", sequence="todre(keep=0.5, relevant=1.0)").attach(no_full) as cache, torch.no_grad():
        no_full(**inputs, past_key_values=cache)
    assert cache.kv_tokens()[0] == inputs["input_ids"].shape[1] - TOKENS // 2
    if supported_here("qwen3_vl"):
        qwen3, make3 = qwen3_vl()  # Qwen3-VL's tower has no [CLS] either
        with (
            pytest.raises(UnsupportedModelError, match=r"no \[CLS\]"),
            Sieve("full", sequence="vtc_cls(keep=0.5)").attach(qwen3) as cache,
        ):
            qwen3(**make3(), past_key_values=cache)
    fake = SimpleNamespace(config=SimpleNamespace(model_type="some_vlm", vision_config=object()))
    with pytest.raises(UnsupportedModelError, match=r"before the LLM.*in-LLM method"):
        adapter_for(fake, build("fopru"))
    with pytest.raises(KVSieveError, match="keep must be"):
        build("fopru(keep=1.5)")
