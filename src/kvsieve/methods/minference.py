"""``minference``: per-head sparse patterns chosen offline, indices estimated online (Jiang et al., NeurIPS 2024,
"MInference 1.0", arXiv:2407.02490).

Each attention head follows one of three patterns, found once per model by an offline search on a calibration text
(:func:`search`, which writes a profile file loaded by path):

- ``a_shape``: the first (sink) key block and a local window of recent key blocks (static);
- ``vertical_slash``: the key columns ("vertical" lines) and diagonals ("slash" lines) with the most attention from
  the last ``last_q`` queries, estimated online for every input;
- ``block_sparse``: per query block, the key blocks with the highest mean-pooled query x key attention, online.

Sizes are stored as fractions of the context (vertical/slash lines as a share of the keys, local window and top blocks
as a share of the key blocks), so one profile serves prompts of any length. The search is MInference's kernel-aware
search: for every head it evaluates each pattern at several sizes on the calibration input, measures the *recall*
(the share of the true attention mass the pattern computes) and the density (the share of causal pairs), and keeps
the highest-recall candidate within the target density. Without a profile every head uses ``vertical_slash`` with
``vertical``/``slash`` (MInference's most common pattern).

Simplifications: vertical and slash lines are computed as the key blocks they cross (MInference's vertical-slash
kernel reads them at token granularity on GPU); the candidate grid is kvsieve's (fractions of the context), not the
paper's absolute sizes for 128k contexts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import sparse
from ..attention import AttentionCall, block_sparse, dense
from ..errors import KVSieveError
from . import register
from .base import PrefillMethod, hp

FORMAT = "kvsieve.minference-profile/1"
PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
# candidate sizes of the offline search (fractions of the keys or key blocks)
LOCAL_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
LINE_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
TOP_GRID = (0.05, 0.1, 0.2, 0.3, 0.5)


def a_shape_blocks(q: int, t: int, bs: int, local: torch.Tensor, device=None) -> torch.Tensor:
    """``(Hq|1, nq, nk)``: sink block + ``local`` (a share of the key blocks, per head ``(H,)``) recent blocks."""
    nk = sparse.n_blocks(t, bs)
    first, _ = sparse.own_blocks(q, t, bs, device)
    width = torch.clamp(torch.round(local * nk), min=1).long()  # (H,)
    kb = torch.arange(nk, device=device)
    distance = first[None, :, None] - kb[None, None, :]  # (1, nq, nk), in blocks before the own block
    return (distance < width[:, None, None]) | (kb[None, None, :] == 0)


def vertical_slash(call: AttentionCall, bs: int, last_q: int, vertical: torch.Tensor, slash: torch.Tensor):
    """``(B, Hq, nq, nk)``: the top ``vertical`` share of key columns and ``slash`` share of diagonals per head, by the
    last ``last_q`` queries' attention (``vertical``/``slash``: ``(Hq,)`` fractions of the keys)."""
    q = call.n_new
    probs = sparse.last_queries_probs(call, last_q)
    return _lines_to_blocks(probs.sum(2), sparse.slash_sums(probs, q), vertical, slash, q, bs)


def _lines_to_blocks(v_score, s_score, vertical, slash, q, bs):
    t = v_score.shape[-1]

    def top(score, share):
        n = torch.clamp(torch.round(share * t), min=1).long().to(score.device)  # (Hq,)
        rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return rank < n[None, :, None]

    v_sel, s_sel = top(v_score, vertical), top(s_score, slash)
    v_sel[..., 0] = True  # the sink column and the main diagonal, as MInference's kernel always computes them
    s_sel[..., 0] = True
    return sparse.vertical_slash_blocks(v_sel, s_sel, q, bs)


def top_blocks(call: AttentionCall, bs: int, share: torch.Tensor) -> torch.Tensor:
    """``(B, Hq, nq, nk)``: per query block, the top ``share`` (``(Hq,)``) of causal key blocks by pooled attention."""
    q, t = call.n_new, call.keys.shape[2]
    probs = sparse.pooled_block_probs(call, bs)
    causal = sparse.causal_blocks(q, t, bs, call.query.device)
    _, last = sparse.own_blocks(q, t, bs, call.query.device)
    n = torch.clamp(torch.ceil(share.to(probs.device)[:, None] * (last + 1)[None, :]), min=1).long()  # (Hq, nq)
    rank = probs.masked_fill(~causal, -1.0).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return (rank < n[None, :, :, None]) & causal


def load_profile(path: str | Path) -> dict:
    """A profile written by :func:`search`; a one-line KVSieveError naming the fix if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise KVSieveError(
            f"minference profile {str(path)!r} does not exist; make one with "
            "kvsieve.methods.minference.search(model, ids, path) on a calibration text"
        )
    try:
        profile = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise KVSieveError(f"minference profile {str(path)!r} is not JSON ({err}); re-create it with search()") from err
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise KVSieveError(
            f"{str(path)!r} is not a kvsieve minference profile (format {FORMAT!r}); re-create it with "
            "kvsieve.methods.minference.search(model, ids, path)"
        )
    return profile


@register
@dataclass
class MInference(PrefillMethod):
    """Per-head a-shape / vertical-slash / block-sparse patterns from an offline profile, indices estimated online.

    profile: path of a profile written by :func:`search` (None: every head vertical-slash). vertical, slash: shares of
    the keys kept as vertical and slash lines when there is no profile (1.0 computes every block). last_q: queries
    used to estimate vertical-slash indices. block_size: tokens per block.
    """

    profile: str | None = None
    vertical: float = hp(0.02, gt=0.0, le=1.0)
    slash: float = hp(0.05, gt=0.0, le=1.0)
    last_q: int = hp(64, ge=1)
    block_size: int = hp(64, ge=1)

    name = "minference"
    paper = "Jiang et al. 2024, MInference (arXiv:2407.02490)"
    needs = "queries and keys (last queries, pooled blocks); a profile from minference.search"
    simplifications = (
        "vertical/slash lines computed as the key blocks they cross; search grid in fractions of the context"
    )

    def validate(self) -> None:
        if self.profile is not None:
            load_profile(self.profile)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return block_sparse(call, self.blocks(call), self.block_size)

    def blocks(self, call: AttentionCall) -> torch.Tensor:
        hq = call.query.shape[1]
        heads = self._heads(call)
        bs, q, t, dev = self.block_size, call.n_new, call.keys.shape[2], call.query.device
        kind = torch.tensor([PATTERNS.index(h["pattern"]) for h in heads], device=dev)
        size = {
            key: torch.tensor([float(h.get(key, 0.0)) for h in heads], device=dev)
            for key in ("local", "vertical", "slash", "top")
        }
        b, nq, nk = call.query.shape[0], sparse.n_blocks(q, bs), sparse.n_blocks(t, bs)
        chosen = torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=dev)
        if bool((kind == 0).any()):
            chosen |= (kind == 0)[None, :, None, None] & a_shape_blocks(q, t, bs, size["local"], dev)[None]
        if bool((kind == 1).any()):
            vs = vertical_slash(call, bs, self.last_q, size["vertical"], size["slash"])
            chosen |= (kind == 1)[None, :, None, None] & vs
        if bool((kind == 2).any()):
            chosen |= (kind == 2)[None, :, None, None] & top_blocks(call, bs, size["top"])
        counts = torch.bincount(kind, minlength=3).tolist()
        for name, n in zip(PATTERNS, counts, strict=True):
            sparse.add_stat(call, f"prefill_heads_{name}", n / hq, hq)
        return chosen

    def _heads(self, call: AttentionCall) -> list[dict]:
        hq = call.query.shape[1]
        if self.profile is None:
            return [{"pattern": "vertical_slash", "vertical": self.vertical, "slash": self.slash}] * hq
        profile = call.shared.get("minference_profile")
        if profile is None or profile.get("_path") != self.profile:
            profile = load_profile(self.profile)
            profile["_path"] = self.profile
            check_profile(profile, call)
            call.shared["minference_profile"] = profile
        heads = profile["patterns"][call.layer_idx]
        if heads is None:
            raise KVSieveError(
                f"minference profile {self.profile!r} has no patterns for layer {call.layer_idx}; re-create it with "
                "search() on this model"
            )
        return heads


def check_profile(profile: dict, call: AttentionCall) -> None:
    """Refuse a profile made for another model (layers, heads, head size or model name differ)."""
    hq, d = call.query.shape[1], call.query.shape[-1]
    config = getattr(call.module, "config", None)
    name = getattr(config, "_name_or_path", None) or None
    here = (call.n_layers, hq, d)
    made = (profile.get("layers"), profile.get("heads"), profile.get("head_dim"))
    if made != here or (name and profile.get("model") and profile["model"] != name):
        raise KVSieveError(
            f"minference profile {profile.get('_path')!r} was made for {profile.get('model')!r} ({made[0]} layers x "
            f"{made[1]} heads x {made[2]}); this model is {name!r} ({here[0]} x {here[1]} x {here[2]}): make one for "
            "it with kvsieve.methods.minference.search(model, ids, path)"
        )


# --- the offline search -------------------------------------------------------------------------------------------
@dataclass
class _Search(PrefillMethod):
    """Dense attention that, per layer, scores every candidate pattern of every head (used by :func:`search`)."""

    density: float = hp(0.3, gt=0.0, le=1.0)
    last_q: int = hp(64, ge=1)
    block_size: int = hp(64, ge=1)

    name = "minference_search"

    def attend(self, call: AttentionCall) -> torch.Tensor:
        call.shared.setdefault("minference_search", {})[call.layer_idx] = self.choose(call)
        return dense(call)

    def choose(self, call: AttentionCall) -> list[dict]:
        bs, q, t = self.block_size, call.n_new, call.keys.shape[2]
        hq, dev = call.query.shape[1], call.query.device
        mass = sparse.block_mass(call, bs)[0]  # (Hq, nq, nk), batch row 0: the calibration text
        pairs = sparse.causal_pairs(q, t, bs, dev)
        total_pairs = float(pairs.sum())
        diag = sparse.diagonal(q, t, bs, dev)
        candidates: list[tuple[dict, torch.Tensor]] = []
        ones = torch.ones(hq, device=dev)
        for f in LOCAL_GRID:
            candidates.append(({"pattern": "a_shape", "local": f}, a_shape_blocks(q, t, bs, f * ones, dev)))
        probs = sparse.last_queries_probs(call, self.last_q)
        v_score, s_score = probs.sum(2), sparse.slash_sums(probs, q)
        for v in LINE_GRID:
            for s in LINE_GRID:
                blocks = _lines_to_blocks(v_score, s_score, v * ones, s * ones, q, bs)[0]
                candidates.append(({"pattern": "vertical_slash", "vertical": v, "slash": s}, blocks))
        for f in TOP_GRID:
            candidates.append(({"pattern": "block_sparse", "top": f}, top_blocks(call, bs, f * ones)[0]))
        best: list[dict] = []
        scored = []
        for spec, blocks in candidates:
            blocks = (blocks.expand(hq, *diag.shape) | diag) & sparse.causal_blocks(q, t, bs, dev)
            recall = (mass * blocks).sum((-1, -2)) / mass.sum((-1, -2))  # (Hq,)
            density = (blocks.float() * pairs).sum((-1, -2)) / total_pairs
            scored.append((spec, recall, density))
        for head in range(hq):
            fits = [(float(r[head]), -float(d[head]), s) for s, r, d in scored if float(d[head]) <= self.density]
            if fits:
                recall, neg_density, spec = max(fits, key=lambda x: (x[0], x[1]))
            else:  # nothing is sparse enough: the sparsest candidate
                spec, r, d = min(scored, key=lambda x: float(x[2][head]))
                recall, neg_density = float(r[head]), -float(d[head])
            best.append({**spec, "recall": round(recall, 4), "density": round(-neg_density, 4)})
        return best


def search(model, ids: torch.Tensor, path: str | Path, *, density: float = 0.3, last_q: int = 64,
           block_size: int = 64) -> dict:  # fmt: skip
    """MInference's offline pattern search on the calibration tokens ``ids`` ``(1, n)``; writes the profile to
    ``path`` (JSON) and returns it. ``density``: the largest share of causal pairs a head's pattern may compute.

    One prefill with dense attention; per layer and head every candidate pattern and size is scored by recall and
    density on this input (costs one extra full attention pass per layer). Load it with
    ``minference(profile=path)``.
    """
    from ..sieve import Sieve

    if ids.ndim != 2 or ids.shape[0] != 1:
        raise KVSieveError(f"minference.search takes one calibration sequence (1, n), got shape {tuple(ids.shape)}")
    probe = _Search(density=density, last_q=last_q, block_size=block_size)
    text = model.config.get_text_config()
    with Sieve("full", prefill=probe).attach(model) as cache, torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    found = cache.shared.get("minference_search", {})
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    profile = {
        "format": FORMAT,
        "model": getattr(text, "_name_or_path", None) or None,
        "layers": text.num_hidden_layers,
        "heads": heads,
        "head_dim": head_dim,
        "block_size": block_size,
        "density": density,
        "calibration_tokens": int(ids.shape[1]),
        "patterns": [found.get(i) for i in range(text.num_hidden_layers)],
    }
    Path(path).write_text(json.dumps(profile, indent=1))
    return profile
