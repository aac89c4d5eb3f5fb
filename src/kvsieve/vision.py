"""Pre-LLM token pruning: the extension point on a vision-language model's vision encoder and projector.

A pre-LLM method (:class:`VisionPruner`) chooses, per image, which of the image tokens the language model receives
go on, from the projected features (one row per image token, as the LLM receives them) and from statistics of the
vision encoder (its attention and keys at the layers the method names, mapped onto the image tokens). It may also
replace some kept rows by merged features (VisionZip's contextual tokens, VFlowOpt's recycled tokens).

How, without patching transformers:

- forward hooks on the encoder's attention modules recompute, at the requested layers only, the attention
  probabilities from the module's own query/key projections (sdpa never returns them) and keep the [CLS] row, the
  attention each patch receives (averaged over queries and heads) and the keys (averaged over heads);
- a forward hook on the projector (LLaVA's ``multi_modal_projector``, Qwen2/3-VL's ``visual.merger``, Idefics3's
  ``connector``) calls the method with the features and statistics, writes the merged rows into its output and records
  which image tokens go on; the first decoder layer's hook (:mod:`kvsieve.sequence`) then drops the other rows before
  the LLM computes anything, keeping every kept token's original position (M-RoPE included).

The image-token placeholders and the number of features are unchanged, so the model's own embedding merge and
position computation run as usual. The hooks are registered when ``attach`` starts and removed when it ends.
Supported: LLaVA-1.5 (CLIP, [CLS]), LLaVA-NeXT (CLIP, [CLS], AnyRes: a thumbnail and crops per image, each a unit;
the row-end newline tokens always go on), Qwen2-VL (no [CLS]), Qwen2.5-VL (no [CLS], window attention: statistics
from its full-attention blocks, in the original patch order), Qwen3-VL (no [CLS], no window attention; its DeepStack
features, added to the image tokens' hidden states after the first decoder layers, follow the kept rows:
:mod:`kvsieve.deepstack`), Idefics3 / SmolVLM (SigLIP, no [CLS], pixel shuffle), Gemma 3 (SigLIP, no [CLS], k x k
average pooling; its image tokens attend to each other in both directions: :mod:`kvsieve.sliding`).

A method may ask for more than the default statistics (``VisionPruner.encoder_extras``): the per-head values, the
attention from the mean query (a relay for encoders without [CLS]), the head-averaged attention matrix, and the
entropy of each patch's pixels (``"entropy"``, computed from the vision tower's input).
"""

from __future__ import annotations

import functools
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
    # only when the method lists them in ``encoder_extras``:
    values: torch.Tensor | None = None  # (H, P, d) values per head
    mean_query: torch.Tensor | None = None  # (P,) attention from the mean query of each head, averaged over heads
    matrix: torch.Tensor | None = None  # (P, P) attention probabilities averaged over heads
    cls_logits: torch.Tensor | None = None  # (P,) [CLS] row of the attention logits (before softmax), heads averaged


@dataclass
class ImageLayout:
    """An AnyRes image (LLaVA-NeXT): its thumbnail unit, its crop units (row-major over the crop grid), the crop grid
    ``(rows, columns)``, and ``grid``: the unpadded token grid of all crops together, each entry ``unit x N + index``
    (the order the LLM receives the crop tokens in, without the newline column)."""

    base: int
    crops: list[int]
    crop_grid: tuple[int, int]
    grid: torch.Tensor


class VisionView:
    """What a pre-LLM method sees: per image unit (an image, or a crop of a split image) ``u``, the projected features
    ``features[u]`` ``(N_u, D)``, the token grid, and encoder statistics mapped onto the ``N_u`` tokens."""

    def __init__(
        self,
        adapter: Adapter,
        features: list[torch.Tensor],
        stats: dict,
        keep: float,
        grids: list,
        entropy: list[torch.Tensor] | None = None,
    ):
        self.adapter, self.features, self.keep, self._stats, self._grids = adapter, features, keep, stats, grids
        self._entropy = entropy

    @property
    def layouts(self) -> list[ImageLayout] | None:
        """Per image, its thumbnail and crops (LLaVA-NeXT AnyRes); None for models whose units are whole images."""
        return getattr(self.adapter, "layouts", None)

    def encoder(self, layer: int) -> list[EncoderStats]:
        """Per unit, the raw statistics of encoder ``layer`` over the encoder's tokens (see :meth:`pool`)."""
        return self._layer(layer)

    def pool(self, values: torch.Tensor, u: int) -> torch.Tensor:
        """Encoder-token values ``(P, ...)`` of unit ``u`` averaged onto its image tokens ``(N_u, ...)``."""
        return self.adapter.pool(values, u)

    def entropy(self) -> list[torch.Tensor]:
        """Per unit ``(N_u,)``: the entropy (bits) of each patch's grey levels, pooled onto the image tokens; needs
        ``"entropy"`` in the method's ``encoder_extras``."""
        if self._entropy is None:
            raise KVSieveError("patch entropy was not computed; list 'entropy' in encoder_extras")
        return [self.adapter.pool(e, u) for u, e in enumerate(self._entropy)]

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

    def source_layers(self, layers) -> list[int]:
        """The distinct encoder layers whose statistics stand for ``layers`` (sorted): the layers themselves, except on
        Qwen2.5-VL, whose windowed blocks are read at the nearest full-attention block."""
        return sorted({self.adapter.source_layer(i % self.adapter.n_layers) for i in layers})

    def _layer(self, layer: int) -> list[EncoderStats]:
        index = self.adapter.source_layer(layer % self.adapter.n_layers)
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
    encoder_extras: ClassVar[frozenset[str]] = frozenset()
    """More statistics the method reads: ``"values"``, ``"mean_query"``, ``"matrix"``, ``"cls_logits"`` (see
    :class:`EncoderStats`),
    ``"entropy"`` (patch pixel entropy, :meth:`VisionView.entropy`)."""

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

    def stats(self, module, args, kwargs, want_cls: bool, extras: frozenset[str] = frozenset()) -> list[EncoderStats]:
        """Statistics per unit from an encoder attention module's input (``extras``: see ``encoder_extras``)."""
        raise NotImplementedError

    def patch_entropy(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Per unit ``(P,)``: the entropy of each encoder token's patch of the tower's pixel input."""
        raise NotImplementedError

    def token_keep(self, rows: torch.Tensor) -> torch.Tensor:
        """The kept mask over the LLM's image tokens from the kept mask over the projector's rows (units in order)."""
        return rows

    def extra_hooks(self, current: dict) -> list:
        """Hooks an architecture needs besides the tower, attention and projector hooks."""
        return []

    def check(self, method) -> None:
        """Raise UnsupportedModelError if ``method`` cannot run on this model (before any work)."""

    def start(self, grid: torch.Tensor | None) -> None:
        """Called when the tower starts encoding (``grid``: Qwen's ``grid_thw``, else None), before any statistics."""

    def source_layer(self, layer: int) -> int:
        """The encoder layer (0..n-1) whose attention stands for ``layer``'s (Qwen2.5-VL: a full-attention block)."""
        return layer

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


def _mean_query(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention ``(..., L)`` from each head's mean query (over the tokens), averaged over heads (``q, k: (..., H, L,
    d)``): FlowCut's relay for encoders without [CLS]."""
    return _qk_probs(q.mean(dim=-2, keepdim=True), k, scale)[..., 0, :].mean(dim=-2)


def grey_entropy(patches: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each patch's grey levels: ``patches`` ``(M, C, S)`` (channels, pixels) are averaged over
    channels and binned into 256 levels between the smallest and the largest value of the whole input."""
    grey = patches.float().mean(dim=1)
    lo, hi = grey.min(), grey.max()
    levels = ((grey - lo) / (hi - lo).clamp(min=1e-12) * 255).round().long()
    hist = torch.zeros(grey.shape[0], 256).scatter_add_(1, levels.cpu(), torch.ones(levels.shape))
    prob = hist / hist.sum(dim=1, keepdim=True)
    return -(prob * torch.log2(prob.clamp(min=1e-12))).sum(dim=1)


class _SiglipLike(Adapter):
    """Encoders whose attention has ``q_proj``/``k_proj`` over ``(units, tokens, dim)`` (CLIP, SigLIP, Idefics3)."""

    def stats(self, module, args, kwargs, want_cls: bool, extras: frozenset[str] = frozenset()) -> list[EncoderStats]:
        hidden = args[0] if args else kwargs["hidden_states"]
        u, p, _ = hidden.shape
        h = module.num_heads
        q = module.q_proj(hidden).view(u, p, h, -1).transpose(1, 2)
        k = module.k_proj(hidden).view(u, p, h, -1).transpose(1, 2)
        probs = _qk_probs(q, k, module.scale)  # (U, H, P, P)
        received = probs.mean(dim=(1, 2))
        cls = probs[:, :, 0, :].mean(dim=1) if self.has_cls else None
        keys = k.mean(dim=1)
        values = module.v_proj(hidden).view(u, p, h, -1).transpose(1, 2).float() if "values" in extras else None
        mean_query = _mean_query(q, k, module.scale) if "mean_query" in extras else None
        matrix = probs.mean(dim=1) if "matrix" in extras else None
        logits = None
        if self.has_cls and "cls_logits" in extras:
            logits = ((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * module.scale)[:, :, 0, :].mean(dim=1)
        return [
            EncoderStats(
                None if cls is None else cls[i],
                received[i],
                keys[i],
                None if values is None else values[i],
                None if mean_query is None else mean_query[i],
                None if matrix is None else matrix[i],
                None if logits is None else logits[i],
            )
            for i in range(u)
        ]

    def patch_entropy(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if pixels.ndim == 5:  # (batch, images, C, H, W)
            pixels = pixels.flatten(0, 1)
        size = self.model.config.vision_config.patch_size
        u, c = pixels.shape[:2]
        patches = pixels.unfold(2, size, size).unfold(3, size, size)  # (U, C, rows, cols, s, s)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, size * size)
        per_unit = grey_entropy(patches).view(u, -1)
        if self.has_cls:  # the [CLS] token has no patch
            per_unit = torch.cat([per_unit.new_zeros(u, 1), per_unit], dim=1)
        return list(per_unit)

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


class _InstanceAttribute:
    """A handle whose ``remove()`` undoes an attribute set on one instance after the handle was made: the value the
    instance had before (an enclosing ``attach`` block's), or none, so that its class's method shows again."""

    _NONE = object()

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name
        self.before = obj.__dict__.get(name, self._NONE)

    def remove(self) -> None:
        if self.before is self._NONE:
            self.obj.__dict__.pop(self.name, None)
        else:
            self.obj.__dict__[self.name] = self.before


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT AnyRes: per image a thumbnail and crops, each a CLIP pass (a unit); the model unpads the crops'
    token grid and appends a newline token per row. The LLM-token order is found by packing feature-row indices with
    the model's own ``pack_image_features`` (newline marked -1); newline tokens always go on."""

    name = "llava_next"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.image_sizes: torch.Tensor | None = None
        self.order = torch.zeros(0, dtype=torch.long)
        self.layouts: list[ImageLayout] = []

    def extra_hooks(self, current: dict) -> list:
        # the image sizes reach only get_image_features (called by the forward, or by generate before it), not the
        # tower: wrap that method on this model instance for the attach block (removed with the other hooks)
        handle = _InstanceAttribute(self.inner, "get_image_features")
        original = self.inner.get_image_features

        @functools.wraps(original)  # generate reads the signature to route the image inputs
        def capture(*args, **kwargs):
            sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            if sizes is not None:
                self.image_sizes = sizes
            return original(*args, **kwargs)

        self.inner.get_image_features = capture
        return [handle]

    def units(self, output, grid):
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        units, grids = super().units(output, grid)
        if self.image_sizes is None:
            raise UnsupportedModelError("LLaVA-NeXT pre-LLM pruning needs image_sizes with the images")
        config = self.model.config
        u, n, _ = output.shape
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in self.image_sizes.tolist()]  # fmt: skip
        if sum(counts) != u:
            raise UnsupportedModelError(f"the projector gave {u} crops but image_sizes imply {sum(counts)}")
        index = torch.arange(u * n, dtype=torch.float32).view(u, n, 1)
        packed, _ = self.inner.pack_image_features(
            list(index.split(counts)), self.image_sizes.cpu(), config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0]),
        )  # fmt: skip
        self.order = torch.cat([p[:, 0] for p in packed]).round().long()
        self.layouts = []
        start = 0
        for count, rows, size in zip(counts, packed, self.image_sizes.tolist(), strict=True):
            crops = list(range(start + 1, start + count))
            if crops:
                body = rows[n:, 0].round().long()
                height = int((body < 0).sum())
                grid2d = body.view(height, -1)[:, :-1]
                crop_grid = get_anyres_image_grid_shape(
                    size, config.image_grid_pinpoints, config.vision_config.image_size
                )
                self.layouts.append(ImageLayout(start, crops, tuple(crop_grid), grid2d))
            else:
                self.layouts.append(ImageLayout(start, [], (0, 0), torch.zeros(0, 0, dtype=torch.long)))
            start += count
        return units, grids

    def join(self, output, units):
        return torch.stack(units, dim=0)

    def token_keep(self, rows: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(self.order.numel(), dtype=torch.bool)
        feature = self.order >= 0
        keep[feature] = rows[self.order[feature]]
        return keep


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


class Gemma3Adapter(_SiglipLike):
    """Gemma 3: SigLIP without [CLS], one pass per image; the projector averages ``k x k`` patches (``k`` = patches
    per side / tokens per side) into each token. Its image tokens attend to each other in both directions in the LLM
    (:mod:`kvsieve.sliding`), which follows the kept rows."""

    name = "gemma3"

    def projector(self) -> torch.nn.Module:
        return self.inner.multi_modal_projector

    def units(self, output, grid):
        u = output.shape[0]
        projector = self.inner.multi_modal_projector
        p, s, k = projector.patches_per_image, projector.tokens_per_side, projector.kernel_size
        if p != s * k:
            raise UnsupportedModelError(f"Gemma 3's projector pools {p} patches per side into {s} with windows of {k}")
        row = torch.arange(s)[:, None] * k + torch.arange(k)[None, :]  # (s, k): patch rows (or columns) of a token
        groups = (row[:, None, :, None] * p + row[None, :, None, :]).reshape(s * s, k * k)  # row-major tokens
        self.groups = [groups] * u
        return [output[i] for i in range(u)], [(s, s)] * u

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

    def stats(self, module, args, kwargs, want_cls: bool, extras: frozenset[str] = frozenset()) -> list[EncoderStats]:
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[0]
        q, k, v = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        emb = kwargs.get("position_embeddings")
        if emb is not None:
            rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
            q, k = rope(q, k, *emb)
        cu = kwargs["cu_seqlens"].tolist()
        out = []
        for a, b in itertools.pairwise(cu):
            qs, ks = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)  # (H, L, d)
            probs = _qk_probs(qs, ks, module.scaling)
            out.append(
                EncoderStats(
                    None,
                    probs.mean(dim=(0, 1)),
                    ks.mean(dim=0),
                    v[a:b].transpose(0, 1).float() if "values" in extras else None,
                    _mean_query(qs, ks, module.scaling) if "mean_query" in extras else None,
                    probs.mean(dim=0) if "matrix" in extras else None,
                )
            )
        return out

    def patch_entropy(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Qwen2-VL's tower input is one row per patch (channels x frames x pixels), in the encoder's token order."""
        c = self.inner.visual.config.in_channels
        entropy = grey_entropy(pixels.reshape(pixels.shape[0], c, -1))
        return list(entropy.split([int(g.numel()) for g in self.groups])) if self.groups else [entropy]

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


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's tower with window attention. The tower reorders the patches window by window (in
    groups of 2 x 2, the merger's groups) before its blocks, only the ``fullatt_block_indexes`` blocks attend over the
    whole image, and the merger's output is put back in the original order only after the projector. So:

    - statistics come from full-attention blocks only: a requested windowed block is read at the nearest
      full-attention block (ties: the earlier), the attention it computes over the whole image, and every statistic
      is put back in the original patch order before it is pooled 2 x 2 onto the LLM's tokens;
    - the projector's rows are shown to the method in the original (LLM) order, and merged rows are written back in
      the window order the model undoes itself.
    """

    name = "qwen2_5_vl"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        config = self.inner.visual.config
        self.full = sorted(int(i) % self.n_layers for i in (config.fullatt_block_indexes or []))
        self.window_index = torch.zeros(0, dtype=torch.long)  # per merged token (window order): its original index
        self.n_images = 0

    def start(self, grid: torch.Tensor | None) -> None:
        if grid is None:
            raise UnsupportedModelError("Qwen2.5-VL pre-LLM pruning needs image_grid_thw with the images")
        visual = self.inner.visual
        if hasattr(visual, "get_window_index"):  # older transformers releases: a method of the tower
            index = visual.get_window_index(grid)[0]
        else:
            window = sys.modules[type(visual).__module__].get_vision_window_index
            index = window(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
        self.window_index = index.cpu().long()
        self.n_images = grid.shape[0]

    def check(self, method) -> None:
        if not self.full and method.encoder_layers(self.n_layers):
            raise UnsupportedModelError(
                f"{method.name} reads the vision encoder's attention, and this Qwen2.5-VL tower has no full-attention "
                "block (fullatt_block_indexes is empty), so none spans the image; use todre or an in-LLM method "
                "(fastv, transprune)"
            )

    def source_layer(self, layer: int) -> int:
        if not self.full:
            return layer
        return min(self.full, key=lambda f: (abs(f - layer), f))

    def _patch_order(self, start: int, size: int) -> torch.Tensor:
        """For the merged tokens ``start .. start+size`` of one image (window order), each patch's index in the
        image's original patch order (2 x 2 groups stay together)."""
        unit = self.inner.visual.spatial_merge_size**2
        local = self.window_index[start : start + size] - start
        return (local[:, None] * unit + torch.arange(unit)).flatten()

    def stats(self, module, args, kwargs, want_cls: bool, extras: frozenset[str] = frozenset()) -> list[EncoderStats]:
        out = super().stats(module, args, kwargs, want_cls, extras)
        unit = self.inner.visual.spatial_merge_size**2
        if len(out) != self.n_images or sum(int(s.received.numel()) for s in out) != self.window_index.numel() * unit:
            raise UnsupportedModelError("Qwen2.5-VL statistics were read at a block whose layout kvsieve does not know")
        start = 0
        for i, s in enumerate(out):
            size = s.received.numel() // unit
            order = self._patch_order(start, size).argsort().to(s.received.device)  # window position of each patch
            start += size
            out[i] = EncoderStats(
                None,
                s.received[order],
                s.keys[order],
                None if s.values is None else s.values[:, order],
                None if s.mean_query is None else s.mean_query[order],
                None if s.matrix is None else s.matrix[order][:, order],
            )
        return out

    def units(self, output, grid):
        if output.shape[0] != self.window_index.numel():
            raise UnsupportedModelError("the Qwen2.5-VL merger's output does not match the images' window index")
        original = output[self.window_index.argsort().to(output.device)]
        return super().units(original, grid)

    def join(self, output, units):
        return torch.cat(units, dim=0)[self.window_index.to(output.device)]


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's tower layout (2D RoPE, no [CLS], 2 x 2 merger ``visual.merger``) with learned position
    embeddings added before the blocks and no window attention (every block attends over the whole image, so any
    block's statistics are read as they are). Its DeepStack mergers feed the LLM besides ``visual.merger``: the
    features they add after the first decoder layers follow the kept rows (:mod:`kvsieve.deepstack`, installed here
    for in-LLM methods too)."""

    name = "qwen3_vl"

    def extra_hooks(self, current: dict) -> list:
        from .deepstack import install_deepstack

        return install_deepstack(self.model, current)


ADAPTERS: dict[str, type[Adapter]] = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter, "qwen2_vl": Qwen2VLAdapter,
                                      "qwen2_5_vl": Qwen25VLAdapter, "qwen3_vl": Qwen3VLAdapter,
                                      "idefics3": Idefics3Adapter, "smolvlm": Idefics3Adapter,
                                      "gemma3": Gemma3Adapter}  # fmt: skip


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
    adapter = ADAPTERS[kind](model)
    adapter.check(method)
    return adapter


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
    return handles + adapter.extra_hooks(current)


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
        found = _vision_stage(current)
        if found is None:
            return None
        current["stats"] = {}
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        current["grid"] = grid if isinstance(grid, torch.Tensor) else None
        adapter.start(current["grid"])
        current["pixels"] = None
        if "entropy" in getattr(found[0], "encoder_extras", ()):
            pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
            current["pixels"] = pixels.detach()
        return None

    return hook


def _encoder_hook(adapter: Adapter, index: int, current: dict):
    def hook(module, args, kwargs, output):
        found = _vision_stage(current)
        if found is None:
            return None
        wanted = {adapter.source_layer(i % adapter.n_layers) for i in found[0].encoder_layers(adapter.n_layers)}
        if index in wanted:
            with torch.no_grad():
                current.setdefault("stats", {})[index] = adapter.stats(
                    module, args, kwargs, adapter.has_cls, getattr(found[0], "encoder_extras", frozenset())
                )
        return None

    return hook


def _projector_hook(adapter: Adapter, current: dict):
    def hook(module, args, output):
        found = _vision_stage(current)
        if found is None:
            return None
        method, stage = found
        units, grids = adapter.units(output, current.get("grid"))
        pixels = current.pop("pixels", None)
        entropy = adapter.patch_entropy(pixels) if pixels is not None else None
        view = VisionView(adapter, units, current.pop("stats", {}), stage.keep, grids, entropy)
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
        current["choice"] = (method.name, adapter.token_keep(torch.cat(image_keep)))
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
