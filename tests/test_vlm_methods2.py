"""flowcut, vflowopt and globalcom2 on tiny random-weight VLMs (LLaVA, LLaVA-NeXT AnyRes, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Idefics3, Gemma 3), and their algorithms on hand-made inputs.

(Every registered sequence method also runs through tests/test_vlm.py: keep 1.0 bitwise, pruned layers computing and
caching exactly the kept rows at their original (M-)RoPE positions, on every tiny VLM.)
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from kvsieve import KVSieveError, Sieve, UnsupportedModelError, build
from kvsieve.methods.flowcut import flow_keep, prune_count
from kvsieve.methods.globalcom2 import crop_scales
from kvsieve.methods.vflowopt import global_attention, recycle
from kvsieve.vision import ADAPTERS, grey_entropy
from test_vlm import _holds, _layer_rows, _run
from tiny_vlms import IMAGE_TOKEN, VLMS, make_vlm

warnings.filterwarnings("ignore", category=FutureWarning)

METHODS = ["flowcut", "vflowopt", "globalcom2"]
ARCHS = VLMS  # every tiny VLM the installed transformers supports


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request):
    return request.param, *make_vlm(request.param)


def _units(arch: str, n_images: int) -> list[int]:
    """Tokens per unit (image, or LLaVA-NeXT thumbnail and crops; its newline tokens are never pruned)."""
    return {"llava": [16] * n_images, "llava_next": [16] * 5 * n_images, "qwen2_vl": [16] * n_images,
            "qwen2_5_vl": [16] * n_images, "qwen3_vl": [16] * n_images, "idefics3": [4] * n_images,
            "gemma3": [16] * n_images}[arch]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_keep_1_is_bitwise_the_unpruned_model(vlm, method):
    _, model, make = vlm
    inputs = make(n_images=2)
    ref = _run(model, DynamicCache(config=model.config), inputs)
    with Sieve("full", sequence=f"{method}(keep=1.0)").attach(model) as cache:
        got = _run(model, cache, inputs)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


@pytest.mark.parametrize("method", ["flowcut", "vflowopt"])
def test_exactly_the_kept_image_tokens_reach_the_llm_at_their_positions(vlm, method):
    arch, model, make = vlm
    inputs = make(n_images=2)
    n = inputs["input_ids"].shape[1]
    _, full_embs, _, _, _ = _layer_rows(model, "fastv(keep=1.0)", inputs)
    for keep in (0.5, 0.25):
        rows, embs, positions, held, _ = _layer_rows(model, f"{method}(keep={keep})", inputs)
        dropped = sum(u - max(1, int(u * keep)) for u in _units(arch, 2))
        assert set(rows.values()) == {n - dropped}, (arch, keep)
        assert held == [_holds(model, i, n - dropped) for i in range(len(held))], (arch, keep)
        i, kept = next(iter(positions.items()))  # the first layer that keeps positions (not sliding-window)
        ids = inputs["input_ids"][0]
        assert int((ids[kept] != IMAGE_TOKEN).sum()) == int((ids != IMAGE_TOKEN).sum())  # every text token stays
        cos, _ = embs[i]
        assert torch.equal(cos, full_embs[i][0].index_select(-2, kept))  # original (M-)RoPE positions


def _record_choice(monkeypatch, cls):
    seen = []
    original = cls.select_vision

    def spy(self, view):
        choice = original(self, view)
        seen.append((view, choice))
        return choice

    monkeypatch.setattr(cls, "select_vision", spy)
    return seen


def test_globalcom2_crops_follow_the_thumbnail_and_newlines_stay(monkeypatch):
    from kvsieve.methods.globalcom2 import GlobalCom2

    model, make = make_vlm("llava_next")
    inputs = make(n_images=1)
    n = inputs["input_ids"].shape[1]
    seen = _record_choice(monkeypatch, GlobalCom2)
    keep = 0.5
    rows, _, positions, _held, _ = _layer_rows(model, f"globalcom2(keep={keep})", inputs)
    ((view, choice),) = seen
    (layout,) = view.layouts
    assert layout.base == 0 and layout.crops == [1, 2, 3, 4] and layout.crop_grid == (2, 2)
    assert layout.grid.shape == (8, 8)
    thumb = view.pool(view.encoder(view.n_encoder_layers - 1)[0].cls_logits, 0)
    scales = crop_scales(thumb, (2, 2), keep, 10.0)
    assert [len(k) for k in choice.keep] == [8] + [int(16 * float(s)) for s in scales]
    kept_image = sum(len(k) for k in choice.keep)
    assert set(rows.values()) == {n - (80 - kept_image)}  # the 8 newline tokens always go on
    ids = inputs["input_ids"][0]
    assert int((ids[positions[0]] == IMAGE_TOKEN).sum()) == kept_image + 8


def test_globalcom2_unpadded_crops_map_onto_the_llm_tokens(monkeypatch):
    """A non-square image: the model unpads the crops' grid; the kept mask follows the model's own packing."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from kvsieve.methods.globalcom2 import GlobalCom2

    model, _make = make_vlm("llava_next")
    size = [64, 40]
    config = model.config
    count = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
    packed, _ = model.model.pack_image_features([torch.zeros(count, 16, 1)], torch.tensor([size]), "default",
                                                image_newline=torch.zeros(1))  # fmt: skip
    tokens = packed[0].shape[0]
    assert tokens < 16 + 16 * (count - 1) + 8  # unpadding removed tokens
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN] * tokens + [8, 9, 10, 11]])
    pixels = torch.randn(1, count, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "pixel_values": pixels, "image_sizes": torch.tensor([size])}
    seen = _record_choice(monkeypatch, GlobalCom2)
    rows, _, _positions, _, _ = _layer_rows(model, "globalcom2(keep=0.25)", inputs)
    ((view, choice),) = seen
    (layout,) = view.layouts
    newlines = layout.grid.shape[0]
    valid = layout.grid.numel()
    assert 16 + valid + newlines == tokens
    kept = sum(len(k) for k in choice.keep)
    assert set(rows.values()) == {ids.shape[1] - (16 + valid - kept)}
    assert all(int(i) in set((layout.grid[layout.grid // 16 == u] % 16).tolist())
               for u in layout.crops for i in choice.keep[u])  # fmt: skip
    with Sieve("full", sequence="globalcom2(keep=0.25)").attach(model) as cache, torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("method", METHODS)
def test_generation_end_to_end(method):
    for arch in [a for a in ARCHS if a != "idefics3"]:
        model, make = make_vlm(arch)
        inputs = make(n_images=1)
        n = inputs["input_ids"].shape[1]
        with Sieve("full", sequence=f"{method}(keep=0.25)").attach(model) as cache, torch.no_grad():
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, n + 4)
        assert cache.kv_tokens()[-1] < n, (arch, method)  # the prompt was pruned


def test_vflowopt_recycled_tokens_are_weighted_means(monkeypatch):
    from kvsieve.methods.vflowopt import VFlowOpt

    model, make = make_vlm("llava")
    inputs = make(n_images=1)
    seen = _record_choice(monkeypatch, VFlowOpt)
    with Sieve("full", sequence="vflowopt(keep=0.25, cell=2)").attach(model) as cache, torch.no_grad():
        model(**inputs, past_key_values=cache)
    ((view, choice),) = seen
    assert len(choice.keep[0]) == 4 and choice.merged[0] is not None
    targets, feats = choice.merged[0]
    assert set(targets.tolist()) <= set(choice.keep[0].tolist())
    stats = view.encoder(view.n_encoder_layers - 2)[0]
    attention = view.pool(global_attention(stats.matrix, 7.0), 0).float()
    importance = attention / attention.sum() + 0.5 * view.entropy()[0].float().softmax(dim=0)
    _, groups = recycle(importance, (4, 4), 4, 2)
    for g in groups:
        if g.numel() > 1:
            w = importance[g] / importance[g].sum()
            row = (targets == g[0]).nonzero().item()
            assert torch.allclose(feats[row].float(), (w[:, None] * view.features[0][g].float()).sum(0), atol=1e-6)


# -- algorithms on hand-made inputs -------------------------------------------------------------------------------


def test_flowcut_prune_count_follows_attention_concentration():
    uniform = torch.full((100,), 0.01)
    assert prune_count(uniform, 4, 20) == 0  # flat attention: nothing is redundant yet
    peaked = torch.zeros(100).index_fill_(0, torch.tensor([3]), 1.0) + 1e-9
    assert prune_count(peaked, 4, 20) == round(80 / math.sqrt(4) * (1 - 0))  # entropy ~0
    assert prune_count(uniform, 0, 20) == 100  # the feature layer: down to the target


def test_flowcut_keeps_the_target_by_cumulative_score():
    n = 12
    relay = torch.full((n,), 1.0 / n)
    cls_attn = torch.linspace(0.1, 1.0, n)
    parts = [(torch.stack([cls_attn, cls_attn, torch.ones(n)], dim=-1), relay) for _ in range(3)]
    kept = flow_keep(parts, 4, 0.5)
    assert kept.tolist() == [8, 9, 10, 11]
    mean_query = [(torch.stack([cls_attn.flip(0), torch.ones(n)], dim=-1), relay)]
    assert flow_keep(mean_query, 3, 0.5).tolist() == [0, 1, 2]


def test_vflowopt_global_attention_and_recycling():
    matrix = torch.full((4, 4), 0.1)
    matrix[:, 2] = 0.7  # token 2 receives far more than the rest: the only global token
    matrix[2] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert torch.allclose(global_attention(matrix, 2.0), matrix[2])
    assert torch.allclose(global_attention(matrix, 100.0), matrix.mean(dim=0))  # none above: every row
    importance = torch.arange(16, dtype=torch.float32)  # 4x4 grid, the last tokens most important
    kept, groups = recycle(importance, (4, 4), 6, 2)
    assert len(kept) == 6
    rest = torch.cat(groups)
    assert sorted(torch.cat([kept, rest]).unique().tolist()) == list(range(16))  # nothing lost: kept or recycled
    for g in groups:  # one region each; the group's kept token is its most important member
        regions = {(int(i) // 4 // 2, int(i) % 4 // 2) for i in g}
        assert len(regions) == 1 and int(g[0]) in kept.tolist() and importance[g[0]] == importance[g].max()
    kept, groups = recycle(importance, (4, 4), 2, 1)  # 1x1 regions: more regions than the budget
    assert len(kept) == 2 and len(groups) <= 2


def test_globalcom2_crop_scales():
    thumb = torch.zeros(16)
    thumb[[0, 1, 4, 5]] = 50.0  # the top-left quarter holds the attention
    scales = crop_scales(thumb, (2, 2), 0.25, 10.0)
    assert int(scales.argmax()) == 0 and torch.allclose(scales.mean(), torch.tensor(0.25, dtype=scales.dtype))
    assert bool((scales <= 1.0).all())
    flat = crop_scales(torch.ones(16), (2, 2), 0.25, 10.0)
    assert torch.allclose(flat, torch.full((4,), 0.25, dtype=flat.dtype))


def test_patch_entropy():
    flat = torch.zeros(1, 3, 16)
    two = torch.cat([torch.zeros(1, 3, 8), torch.ones(1, 3, 8)], dim=2)
    assert grey_entropy(torch.cat([flat, two])).tolist() == [0.0, 1.0]


def test_bad_input_is_refused():
    model, make = make_vlm("llava")
    text_only = {"input_ids": make()["input_ids"][:, :5]}
    for method in METHODS:
        with (
            Sieve("full", sequence=f"{method}(keep=0.5)").attach(model) as cache,
            pytest.raises(KVSieveError, match="none"),
        ):
            model(**text_only, past_key_values=cache)
        for keep in (0.0, 1.5):
            with pytest.raises(KVSieveError, match="keep must be"):
                build(f"{method}(keep={keep})")
    from kvsieve.vision import adapter_for

    unknown = SimpleNamespace(config=SimpleNamespace(model_type="some_vlm", vision_config=object()))
    assert "some_vlm" not in ADAPTERS
    for method in METHODS:  # a VLM kvsieve has no pre-LLM adapter for
        with pytest.raises(UnsupportedModelError, match="before the LLM"):
            adapter_for(unknown, build(method))
    for spec in ("flowcut(decay=1.0)", "vflowopt(cell=0)", "globalcom2(temperature=0)"):
        with pytest.raises(KVSieveError):
            build(spec)
    text_model = SimpleNamespace(config=SimpleNamespace(model_type="llama", vision_config=None))
    with pytest.raises(KVSieveError, match="in-LLM method"):  # a text model: the error names the fix
        adapter_for(text_model, build("flowcut"))
