"""Where the cache's tokens live: plain buffered segments, and the packed forms (quantised, merged across layers)."""

from .segment import Segment, grown_capacity, max_spare

__all__ = ["Segment", "grown_capacity", "max_spare"]
