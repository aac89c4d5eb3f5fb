"""Offline haystacks: the filler text the needles are hidden in.

Three sources, all available without a download:

``"pydoc"``
    Python documentation prose: the values of CPython's ``pydoc_data.topics.topics`` (about 113k
    SmolLM2 tokens; the exact text follows the Python version).
``"licenses"``
    The licence texts under ``/usr/share/common-licenses/`` (Debian and Ubuntu ship them), with hard
    line wraps joined into paragraphs. :class:`HaystackNotFoundError` if the folder is missing.
``"noise"``
    The classic repeated noise of the passkey test: "The grass is green. The sky is blue. ...".

A haystack is tokenized once per tokenizer (:func:`haystack_index`); a slice starts on a sentence or
paragraph boundary drawn from the sample's random generator, runs for a given number of tokens, is cut on a
token boundary, and wraps around to the start of the text when it reaches the end.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from kvsieve.errors import KVSieveError

__all__ = [
    "HAYSTACKS",
    "LICENSES_DIR",
    "NOISE",
    "HaystackIndex",
    "HaystackNotFoundError",
    "UnknownHaystackError",
    "canonical_haystack",
    "haystack_index",
    "insertion_points",
    "load_haystack",
]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LICENSES_DIR = Path("/usr/share/common-licenses")

# Start of a sentence (after . ! or ? and whitespace, before a capital, digit or quote) or of a paragraph
# (after a blank line).
_BOUNDARY = re.compile(r"(?<=[.!?])(?:[ \t]+|[ \t]*\n[ \t]*)(?=[A-Z0-9\"'(])|\n[ \t]*\n\s*(?=[A-Z])")
_RULE_LINE = re.compile(r"^[ \t]*([*=\-~^#])\1{3,}[ \t]*$", re.MULTILINE)


class HaystackNotFoundError(KVSieveError, FileNotFoundError):
    """A haystack whose source text is not on this machine."""


class UnknownHaystackError(KVSieveError, KeyError):
    """A haystack name that is not in :data:`HAYSTACKS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _noise() -> str:
    return " ".join([NOISE] * 200)


def _pydoc() -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    text = _RULE_LINE.sub("", text)  # the ****** under section titles
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def _unwrap(text: str) -> str:
    """Join hard-wrapped lines into paragraphs; blank lines stay paragraph breaks."""
    paragraphs = re.split(r"\n[ \t]*\n", text)
    out = [" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs]
    return "\n\n".join(p for p in out if p)


def _licenses() -> str:
    if not LICENSES_DIR.is_dir():
        raise HaystackNotFoundError(
            f"haystack 'licenses' needs the licence texts in {LICENSES_DIR}, which does not exist on this "
            "machine (Debian/Ubuntu ship it in the base-files package); use haystack='pydoc' or 'noise'."
        )
    seen: set[Path] = set()
    texts = []
    for path in sorted(LICENSES_DIR.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        texts.append(_unwrap(real.read_text(encoding="utf-8", errors="replace")))
    if not texts:
        raise HaystackNotFoundError(f"haystack 'licenses': {LICENSES_DIR} holds no licence texts.")
    return "\n\n".join(texts)


HAYSTACKS: dict[str, Callable[[], str]] = {"pydoc": _pydoc, "licenses": _licenses, "noise": _noise}
_ALIASES = {"licences": "licenses", "python-docs": "pydoc", "essay": "pydoc"}


def canonical_haystack(name: str) -> str:
    """The registered name for ``name`` (accepts a few aliases); a clear error for an unknown one."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in HAYSTACKS:
        raise UnknownHaystackError(f"unknown haystack {name!r}; valid: {', '.join(sorted(HAYSTACKS))}")
    return key


@cache
def load_haystack(name: str) -> str:
    """The full text of haystack ``name`` (``"pydoc"``, ``"licenses"`` or ``"noise"``), cached."""
    return HAYSTACKS[canonical_haystack(name)]()


@dataclass
class HaystackIndex:
    """A haystack tokenized once: where each token starts and where sentences may start."""

    name: str
    text: str
    token_starts: list[int]
    boundaries: list[int]
    lower: str = field(repr=False, default="")

    def __post_init__(self) -> None:
        self.lower = self.text.lower()

    @property
    def n_tokens(self) -> int:
        return len(self.token_starts)

    def start_offset(self, rng: Any) -> int:
        """A seeded sentence/paragraph start to begin a slice at."""
        return self.boundaries[rng.randrange(len(self.boundaries))]

    def slice(self, start: int, n_tokens: int) -> str:
        """About ``n_tokens`` tokens of text from char ``start``, cut on a token boundary, wrapping around."""
        parts: list[str] = []
        pos, remaining = start, max(0, n_tokens)
        while remaining > 0:
            first = bisect.bisect_left(self.token_starts, pos)
            available = self.n_tokens - first
            if available <= 0:
                pos = 0
                continue
            if remaining < available:
                parts.append(self.text[pos : self.token_starts[first + remaining]])
                remaining = 0
            else:
                parts.append(self.text[pos:])
                remaining -= available
                pos = 0
        joiner = " " if self.name == "noise" else "\n\n"
        return joiner.join(p.strip() for p in parts if p.strip())

    def contains(self, needle: str) -> bool:
        """Whether ``needle`` occurs anywhere in the haystack (case-insensitive)."""
        return needle.lower() in self.lower


_INDEX_CACHE: dict[tuple[int, str], tuple[Any, HaystackIndex]] = {}


def _chunks(text: str, size: int = 8000) -> list[tuple[int, int]]:
    """Spans of about ``size`` chars ending at paragraph (else sentence, else word) breaks.

    Tokenizing in pieces keeps every call under the model's length limit (and its warning quiet).
    """
    spans, pos = [], 0
    while pos < len(text):
        end = len(text)
        if pos + size < len(text):
            for sep in ("\n\n", ". ", " "):
                cut = text.find(sep, pos + size, pos + 4 * size)
                if cut >= 0:
                    end = cut + len(sep)
                    break
            else:
                end = pos + size
        spans.append((pos, end))
        pos = end
    return spans


def haystack_index(tokenizer: Any, name: str) -> HaystackIndex:
    """The haystack ``name`` tokenized by ``tokenizer`` (cached per tokenizer object)."""
    name = canonical_haystack(name)
    key = (id(tokenizer), name)
    hit = _INDEX_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    text = load_haystack(name)
    spans = _chunks(text)
    enc = tokenizer([text[a:b] for a, b in spans], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    starts = [a + int(o[0]) for (a, _), offsets in zip(spans, enc["offset_mapping"], strict=True) for o in offsets]
    # Offsets are not always monotone (byte-level merges); keep them sorted for bisect.
    for i in range(1, len(starts)):
        if starts[i] < starts[i - 1]:
            starts[i] = starts[i - 1]
    boundaries = [0, *(m.end() for m in _BOUNDARY.finditer(text) if m.end() < len(text))]
    index = HaystackIndex(name=name, text=text, token_starts=starts, boundaries=boundaries)
    if len(_INDEX_CACHE) >= 16:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
    _INDEX_CACHE[key] = (tokenizer, index)
    return index


def insertion_points(text: str) -> list[int]:
    """Char positions in ``text`` where a sentence may be inserted: its start, sentence starts, its end."""
    return [0, *(m.end() for m in _BOUNDARY.finditer(text) if 0 < m.end() < len(text)), len(text)]
