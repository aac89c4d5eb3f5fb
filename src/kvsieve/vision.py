"""Pre-LLM token pruning: the extension point on a vision-language model's vision encoder and projector.

A pre-LLM method (:class:`VisionPruner`) chooses, per image, which of the image tokens the language model receives
go on, from the projected features (one row per image token, as the LLM receives them) and from statistics of the
vision encoder (its attention and keys at the layers the method names, mapped onto the image tokens). It may also
replace some kept rows by merged features (VisionZip's contextual tokens, VFlowOpt's recycled tokens).

How, without patching transformers:

- forward hooks on the encoder's attention modules recompute, at the requested layers only, the attention
  probabilities from the module's own query/key projections (sdpa never returns them) and keep the [CLS] row, the
  attention each patch receives (averaged over queries and heads) and the keys (averaged over heads);
- a forward hook on the projector (LLaVA's ``multi_modal_projector``, Qwen2-VL's ``visual.merger``, Idefics3's
  ``connector``) calls the method with the features and statistics, writes the merged rows into its output and records
  which image tokens go on; the first decoder layer's hook (:mod:`kvsieve.sequence`) then drops the other rows before
  the LLM computes anything, keeping every kept token's original position (M-RoPE included).

The image-token placeholders and the number of features are unchanged, so the model's own embedding merge and
position computation run as usual. The hooks are registered when ``attach`` starts and removed when it ends.
Supported: LLaVA-1.5 (CLIP, [CLS]), Qwen2-VL (no [CLS]), Idefics3 / SmolVLM (SigLIP, no [CLS], pixel shuffle).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import KVSieveError, UnsupportedModelError
from .sequence import MODALITY, PASS, PassState, Pruner, Stage, apply_rows

PRE_LLM = -1  # the ``after`` of a pre-LLM stage


@dataclass
class EncoderStats:
    """Statistics of one encoder layer for one image unit, over the encoder's tokens ``P``."""

    cls: torch.Tensor | None  # (P,) attention from [CLS] (None: the encoder has no [CLS])
    received: torch.Tensor  # (P,) attention each token receives, averaged over queries and heads
    keys: torch.Tensor  # (P, d) keys averaged over heads


class VisionView:
    """What a pre-LLM method sees: per image unit (an image, or a crop of a split image) ``u``, the projected features
    ``features[u]`` ``(N_u, D)``, the token grid, and encoder statistics mapped onto the ``N_u`` tokens."""

    def __init__(self, adapter: Adapter, features: list[torch.Tensor], stats: dict, keep: float, grids: list):
        self.adapter, self.features, self.keep, self._stats, self._grids = adapter, features, keep, stats, grids

    @property
    def n_units(self) -> int:
        return len(self.features)

    @property
    def has_cls(self) -> bool:
        return self.adapter.has_cls

    @property
    def n_encoder_layers(self) -> int:
        return self.adapter.n_layers

    def count(self, u: int) -> int:
        """Tokens unit ``u`` keeps: ``int(keep x N_u)``, at least one."""
        return max(1, int(self.features[u].shape[0] * self.keep))

    def grid(self, u: int) -> tuple[int, int]:
        """(rows, columns) of unit ``u``'s tokens, in row-major order."""
        return self._grids[u]

    def _layer(self, layer: int) -> list[EncoderStats]:
        index = layer % self.adapter.n_layers
        if index not in self._stats:
            raise KVSieveError(f"encoder layer {layer} was not captured; list it in encoder_layers()")
        return self._stats[index]

    def attention(self, layer: int, query: str = "received") -> list[torch.Tensor]:
        """Per unit ``(N_u,)``: the attention from [CLS] (``query="cls"``) or received from every query
        (``"received"``) at encoder ``layer`` (negative: from the end), pooled onto the image tokens."""
        out = []
        for u, s in enumerate(self._layer(layer)):
            if query == "cls":
                if s.cls is None:
                    raise UnsupportedModelError(
                        f"this vision encoder ({self.adapter.name}) has no [CLS] token; use a method that needs none "
                        "(hiprune, fopru, todre, visionzip)"
                    )
                out.append(self.adapter.pool(s.cls, u))
            else:
                out.append(self.adapter.pool(s.received, u))
        return out

    def keys(self, layer: int) -> list[torch.Tensor]:
        """Per unit ``(N_u, d)``: the encoder keys at ``layer`` (averaged over heads), pooled onto the image tokens."""
        return [self.adapter.pool(s.keys, u) for u, s in enumerate(self._layer(layer))]


@dataclass
class VisionChoice:
    """Per unit: the kept token indices ``keep[u]`` (sorted), and optionally ``merged[u]`` = (indices, features): kept
    rows whose features are replaced (merged tokens)."""

    keep: list[torch.Tensor]
    merged: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None


@dataclass
class VisionPruner(Pruner):
    """Base of the pre-LLM methods: one stage before the first decoder layer, on the image tokens.

    ``keep``: share of each image's tokens that go on. ``layer`` is not used (the stage is before the LLM).
    """

    image_only: ClassVar[bool] = True
    needs: ClassVar[str] = "vision encoder attention"

    def stages(self, n_layers: int) -> list[Stage]:
        return [Stage(PRE_LLM, self.keep)]

    def encoder_layers(self, n: int) -> list[int]:
        """Encoder layers (0..n-1) whose statistics :meth:`select_vision` reads (default: the penultimate, which
        LLaVA feeds to the LLM)."""
        return [n - 2]


# --- adapters ---------------------------------------------------------------------------------------------------
class Adapter:
    """Where a VLM architecture's encoder and projector are, and how encoder tokens map onto image tokens."""

    name: ClassVar[str] = ""
    has_cls: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.inner = model.model
        self.attentions = self.encoder_attentions()
        self.n_layers = len(self.attentions)
        self.groups: list[torch.Tensor] = []  # per unit: (N_u, g) encoder token indices pooled into each image token

    def projector(self) -> torch.nn.Module:
        raise NotImplementedError

    def encoder_attentions(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def stats(self, module, args, kwargs, want_cls: bool) -> list[EncoderStats]:
        """Statistics per unit from an encoder attention module's input."""
        raise NotImplementedError

    def tower(self) -> torch.nn.Module:
        """The vision encoder module (its forward starts an image's encoding)."""
        return self._tower()

    def _tower(self) -> torch.nn.Module:
        raise NotImplementedError

    def units(self, output: torch.Tensor, grid) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """The projector's output split per unit ``(N_u, D)``, and each unit's token grid; sets :attr:`groups`."""
        raise NotImplementedError

    def join(self, output: torch.Tensor, units: list[torch.Tensor]) -> torch.Tensor:
        """The projector's output with the units' (possibly replaced) rows written back."""
        raise NotImplementedError

    def pool(self, values: torch.Tensor, u: int) -> torch.Tensor:
        """Encoder-token values ``(P, ...)`` of unit ``u`` averaged onto its image tokens ``(N_u, ...)``."""
        group = self.groups[u].to(values.device)
        return values[group].mean(dim=1)


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores (ties to the earlier index), sorted: the original order is kept."""
    order = scores.float().argsort(descending=True, stable=True)
    return order[: max(0, min(k, scores.shape[0]))].sort().values


def _qk_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention ``(..., H, L, L)`` in float32."""
    return ((q.float() @ k.float().transpose(-1, -2)) * scale).softmax(dim=-1)


class _SiglipLike(Adapter):
    """Encoders whose attention has ``q_proj``/``k_proj`` over ``(units, tokens, dim)`` (CLIP, SigLIP, Idefics3)."""

    def stats(self, module, args, kwargs, want_cls: bool) -> list[EncoderStats]:
        hidden = args[0] if args else kwargs["hidden_states"]
        u, p, _ = hidden.shape
        h = module.num_heads
        q = module.q_proj(hidden).view(u, p, h, -1).transpose(1, 2)
        k = module.k_proj(hidden).view(u, p, h, -1).transpose(1, 2)
        probs = _qk_probs(q, k, module.scale)  # (U, H, P, P)
        received = probs.mean(dim=(1, 2))
        cls = probs[:, :, 0, :].mean(dim=1) if self.has_cls else None
        keys = k.mean(dim=1)
        return [EncoderStats(None if cls is None else cls[i], received[i], keys[i]) for i in range(u)]

    def _tower(self) -> torch.nn.Module:
        return getattr(self.inner, "vision_tower", None) or self.inner.vision_model

    def encoder_attentions(self) -> list[torch.nn.Module]:
        tower = self._tower()
        encoder = getattr(tower, "vision_model", tower).encoder
        return [layer.self_attn for layer in encoder.layers]


class LlavaAdapter(_SiglipLike):
    """LLaVA-1.5: CLIP ([CLS] + patches), the selected layer's patches projected one to one."""

    name = "llava"
    has_cls = True

    def projector(self) -> torch.nn.Module:
        return self.inner.multi_modal_projector

    def units(self, output, grid):
        u, n, _ = output.shape
        drop_cls = self.model.config.vision_feature_select_strategy == "default"
        self.groups = [torch.arange(n)[:, None] + (1 if drop_cls else 0) for _ in range(u)]
        side = round(n**0.5)
        return [output[i] for i in range(u)], [(side, n // side)] * u

    def join(self, output, units):
        return torch.stack(units, dim=0)


class Idefics3Adapter(_SiglipLike):
    """Idefics3 / SmolVLM: SigLIP without [CLS] per crop; the connector's pixel shuffle folds s x s patches into one
    token (the pooled groups are found by shuffling patch indices the same way)."""

    name = "idefics3"

    def projector(self) -> torch.nn.Module:
        return self.inner.connector

    def units(self, output, grid):
        u, n, _ = output.shape
        connector = self.inner.connector
        side = round((n * connector.scale_factor**2) ** 0.5)
        index = torch.arange(side * side, dtype=torch.float32).view(1, -1, 1)
        groups = connector.pixel_shuffle(index, connector.scale_factor)[0].round().long()  # (n, s*s)
        self.groups = [groups] * u
        g = round(n**0.5)
        return [output[i] for i in range(u)], [(g, n // g)] * u

    def join(self, output, units):
        return torch.stack(units, dim=0)


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: a ViT with 2D RoPE and no [CLS], attention within each image; the merger folds 2 x 2 neighbouring
    patches (consecutive rows) into one token."""

    name = "qwen2_vl"

    def projector(self) -> torch.nn.Module:
        return self.inner.visual.merger

    def _tower(self) -> torch.nn.Module:
        return self.inner.visual

    def encoder_attentions(self) -> list[torch.nn.Module]:
        return [block.attn for block in self.inner.visual.blocks]

    def stats(self, module, args, kwargs, want_cls: bool) -> list[EncoderStats]:
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        emb = kwargs.get("position_embeddings")
        if emb is not None:
            rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
            q, k = rope(q, k, *emb)
        cu = kwargs["cu_seqlens"].tolist()
        out = []
        for a, b in itertools.pairwise(cu):
            qs, ks = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)  # (H, L, d)
            probs = _qk_probs(qs, ks, module.scaling)
            out.append(EncoderStats(None, probs.mean(dim=(0, 1)), ks.mean(dim=0)))
        return out

    def units(self, output, grid):
        if grid is None:
            raise UnsupportedModelError("Qwen2-VL pre-LLM pruning needs image_grid_thw with the images")
        merge = self.inner.visual.spatial_merge_size
        sizes = [int(t * h * w) // merge**2 for t, h, w in grid.tolist()]
        if sum(sizes) != output.shape[0]:
            raise UnsupportedModelError("kvsieve prunes Qwen2-VL images before the LLM, not videos")
        self.groups = [torch.arange(s * merge**2).view(s, merge**2) for s in sizes]
        grids = [(int(h) // merge, int(t * w) // merge) for t, h, w in grid.tolist()]
        return list(output.split(sizes)), grids

    def join(self, output, units):
        return torch.cat(units, dim=0)


ADAPTERS: dict[str, type[Adapter]] = {"llava": LlavaAdapter, "qwen2_vl": Qwen2VLAdapter, "idefics3": Idefics3Adapter,
                                      "smolvlm": Idefics3Adapter}  # fmt: skip


def adapter_for(model: torch.nn.Module, method) -> Adapter:
    """The adapter of ``model``'s architecture; a clear error for a model kvsieve cannot prune before the LLM."""
    kind = getattr(model.config, "model_type", None)
    if getattr(model.config, "vision_config", None) is None:
        raise KVSieveError(
            f"{method.name} prunes a vision encoder's tokens and {type(model).__name__} has no vision tower; use an "
            f"in-LLM method (fastv, transprune, gsearch, aim) for text"
        )
    if kind not in ADAPTERS:
        raise UnsupportedModelError(
            f"{method.name} acts before the LLM, which kvsieve implements for {', '.join(sorted(ADAPTERS))}, not "
            f"{kind!r}; use an in-LLM method (fastv, transprune, todre_llm, gsearch, aim) on this model"
        )
    return ADAPTERS[kind](model)


def install_vision_hooks(model: torch.nn.Module, current: dict) -> list:
    """Hooks on the vision tower, its attention modules and the projector (see the module docstring); none for a VLM
    kvsieve has no adapter for (pre-LLM methods are refused for it in ``check_sequence``).

    ``current``: the hooks' shared holder (the cache of the pass in progress; the encoder statistics and, when the
    encoder runs before the model's forward, as ``generate`` does, the choice waiting for that forward)."""
    kind = getattr(model.config, "model_type", None)
    if kind not in ADAPTERS:
        return []
    adapter = ADAPTERS[kind](model)
    handles = [adapter.tower().register_forward_pre_hook(_tower_hook(adapter, current), with_kwargs=True)]
    for index, module in enumerate(adapter.attentions):
        handles.append(module.register_forward_hook(_encoder_hook(adapter, index, current), with_kwargs=True))
    handles.append(adapter.projector().register_forward_hook(_projector_hook(adapter, current)))
    return handles


def _vision_stage(current: dict) -> tuple[Pruner, Stage] | None:
    """The sequence method of the attach block in progress and its pre-LLM stage, if it has one that prunes."""
    from .sieve import _ACTIVE

    session = _ACTIVE.get()
    method = getattr(session, "sequence", None)
    if not isinstance(method, Pruner):
        return None
    stage = next((s for s in method.stages(session.n_layers) if s.after == PRE_LLM), None)
    return (method, stage) if stage is not None and stage.keep < 1.0 else None


def _tower_hook(adapter: Adapter, current: dict):
    def hook(module, args, kwargs):
        if _vision_stage(current) is None:
            return None
        current["stats"] = {}
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        current["grid"] = grid if isinstance(grid, torch.Tensor) else None
        return None

    return hook


def _encoder_hook(adapter: Adapter, index: int, current: dict):
    def hook(module, args, kwargs, output):
        found = _vision_stage(current)
        if found is None:
            return None
        wanted = {i % adapter.n_layers for i in found[0].encoder_layers(adapter.n_layers)}
        if index in wanted:
            with torch.no_grad():
                current.setdefault("stats", {})[index] = adapter.stats(module, args, kwargs, adapter.has_cls)
        return None

    return hook


def _projector_hook(adapter: Adapter, current: dict):
    def hook(module, args, output):
        found = _vision_stage(current)
        if found is None:
            return None
        method, stage = found
        units, grids = adapter.units(output, current.get("grid"))
        view = VisionView(adapter, units, current.pop("stats", {}), stage.keep, grids)
        with torch.no_grad():
            choice = method.select_vision(view)
        new_units = list(units)
        image_keep = []
        for u, x in enumerate(units):
            kept = torch.zeros(x.shape[0], dtype=torch.bool)
            kept[choice.keep[u].cpu()] = True
            image_keep.append(kept)
            merged = choice.merged[u] if choice.merged else None
            if merged is not None:
                rows, feats = merged
                new_units[u] = x.index_copy(0, rows.to(x.device), feats.to(x.dtype))
        current["choice"] = (method.name, torch.cat(image_keep))
        state = _pass_in_progress(current)
        if state is not None:  # the encoder ran inside the model's forward: prune this pass now
            apply_pending(state, current)
        if choice.merged and any(m is not None for m in choice.merged):
            return adapter.join(output, new_units)
        return None

    return hook


def _pass_in_progress(current: dict) -> PassState | None:
    cache = current.get("cache")
    state = cache.pass_state.get(PASS) if cache is not None else None
    if state is None or not state.active or state.stash.get("started") or state.vision.get("done"):
        return None
    return state


def apply_pending(state: PassState, current: dict) -> None:
    """Apply the pre-LLM choice waiting in ``current`` to the pass ``state`` (before its first decoder layer)."""
    name, image_keep = current.pop("choice")
    if not state.active or not any(s.after == PRE_LLM for s in state.stages):
        return
    if state.rows.shape[0] != 1:
        raise KVSieveError(f"{name} prunes images one prompt at a time; run the prompts with batch size 1")
    image_rows = (state.tokens.modality[0] == MODALITY["image"]).nonzero().flatten()
    if image_rows.numel() != image_keep.numel():
        raise UnsupportedModelError(
            f"the prompt has {image_rows.numel()} image tokens but the projector gave {image_keep.numel()} features"
        )
    keep = torch.ones(state.n, dtype=torch.bool, device=image_rows.device)
    keep[image_rows[~image_keep.to(image_rows.device)]] = False
    keep |= ~state.tokens.prunable[0].to(keep.device)  # protected tokens always go on
    apply_rows(state, keep.nonzero().flatten()[None])
    state.vision["done"] = True
