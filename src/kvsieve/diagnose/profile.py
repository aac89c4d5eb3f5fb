"""Head profiles: diagnosed per-head scores saved as JSON, which head-level methods read.

A profile holds one retrieval score per layer and *query* head (Wu et al. 2024's copy-paste score, see
:mod:`kvsieve.diagnose.retrieval`). Storage is per *KV* head, so with GQA a KV head counts as a retrieval head if any
of the query heads sharing it does: its score is the maximum over its group (:meth:`HeadProfile.kv_scores`).

The package ships a profile for the embedded ``smollm2-135m`` (``profiles/smollm2-135m.json``, written by
``python benchmarks/retrieval_heads.py --write-profile``). For another model, ``kvsieve diagnose --model M --task
niah_single_number --out DIR`` writes ``DIR/head_profile.json``; pass it as ``razorattention(profile='...')``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import KVSieveError

PROFILE_FORMAT = "kvsieve-head-profile"
PROFILE_VERSION = 1
PROFILE_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE_MODEL = "smollm2-135m"
PROFILE_FILE = "head_profile.json"
HOW_TO_PROFILE = (
    "run `kvsieve diagnose --model <model> --task niah_single_number --out DIR` (it writes DIR/head_profile.json) "
    "and pass profile='DIR/head_profile.json' to the method"
)


class ProfileError(KVSieveError, ValueError):
    """A head profile that is missing, malformed or made for another model."""


@dataclass
class HeadProfile:
    """Per-query-head retrieval scores of one model: ``retrieval[layer][head]`` in [0, 1]."""

    model: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    retrieval: list[list[float]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ProfileError(f"profile has {self.n_heads} query heads, not a multiple of {self.n_kv_heads} KV heads")
        if len(self.retrieval) != self.n_layers or any(len(r) != self.n_heads for r in self.retrieval):
            raise ProfileError(f"profile scores must be {self.n_layers} layers x {self.n_heads} heads")

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def scores(self) -> torch.Tensor:
        """Retrieval score per layer and query head, ``(L, Hq)``."""
        return torch.tensor(self.retrieval, dtype=torch.float64)

    def kv_scores(self) -> torch.Tensor:
        """Score per layer and KV head, ``(L, H_kv)``: the maximum over the query heads sharing it."""
        return self.scores().view(self.n_layers, self.n_kv_heads, self.group).amax(dim=-1)

    def top_kv_heads(self, ratio: float) -> torch.Tensor:
        """``(L, H_kv)`` bool: the ``round(ratio x L x H_kv)`` KV heads with the highest scores, across all layers.

        Ties are broken by (layer, head) order, so the choice is deterministic.
        """
        if not 0.0 <= ratio <= 1.0:
            raise ProfileError(f"ratio of retrieval heads must be in [0, 1], got {ratio}")
        flat = self.kv_scores().flatten()
        k = round(ratio * flat.numel())
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order] = True
        return mask.view(self.n_layers, self.n_kv_heads)

    def check(self, n_layers: int, n_kv_heads: int, group: int, head_dim: int) -> None:
        """ProfileError unless the profile was made for a model with these dimensions."""
        want = (self.n_layers, self.n_kv_heads, self.group, self.head_dim)
        got = (n_layers, n_kv_heads, group, head_dim)
        if want != got:
            raise ProfileError(
                f"the head profile for {self.model!r} has {want[0]} layers x {want[1]} KV heads x {want[2]} query "
                f"heads each, head_dim {want[3]}; this model has {got[0]} x {got[1]} x {got[2]}, head_dim {got[3]}. "
                f"No profile exists for this model: {HOW_TO_PROFILE}."
            )

    def to_dict(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "model": self.model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "retrieval": [[round(float(x), 6) for x in row] for row in self.retrieval],
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        rows = data.pop("retrieval")
        text = json.dumps(data, indent=1)[:-2]  # one layer per line below, so the file reads as a table
        body = ",\n".join("  " + json.dumps(row) for row in rows)
        path.write_text(f'{text},\n "retrieval": [\n{body}\n ]\n}}\n')
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"head profile {path} does not exist; {HOW_TO_PROFILE}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ProfileError(f"head profile {path} is not valid JSON ({err}); {HOW_TO_PROFILE}") from err
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{path} is not a kvsieve head profile (format {PROFILE_FORMAT!r}); {HOW_TO_PROFILE}")
        try:
            return cls(
                model=str(data["model"]),
                n_layers=int(data["n_layers"]),
                n_heads=int(data["n_heads"]),
                n_kv_heads=int(data["n_kv_heads"]),
                head_dim=int(data["head_dim"]),
                retrieval=[[float(x) for x in row] for row in data["retrieval"]],
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ProfileError(f"head profile {path} is missing or has a bad field ({err}); {HOW_TO_PROFILE}") from err


def shipped_profile_path(model: str = DEFAULT_PROFILE_MODEL) -> Path:
    """Path of the profile shipped for ``model`` (only ``smollm2-135m`` ships one)."""
    return PROFILE_DIR / f"{model}.json"


def load_profile(profile: str | Path | None) -> HeadProfile:
    """The profile at ``profile``; ``None`` means the one shipped for the embedded smollm2-135m."""
    if profile is None:
        path = shipped_profile_path()
        if not path.is_file():
            raise ProfileError(
                f"the shipped head profile {path} is missing (write it with "
                "`python benchmarks/retrieval_heads.py --write-profile`), or pass profile='...'"
            )
        return HeadProfile.load(path)
    return HeadProfile.load(profile)
