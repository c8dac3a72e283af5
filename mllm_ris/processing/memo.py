"""A bounded least-recently-used memo keyed by the bytes of arrays: what the collator keeps of region
descriptors and a frozen vision tower keeps of features, so that epochs revisiting an image skip the work.

``functools.lru_cache`` needs hashable arguments and bounds by entry count only; here the keys are a
digest of array contents and the bound may be a cost (e.g. bytes).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

__all__ = ["LruMemo", "digest"]

V = TypeVar("V")


def digest(*arrays: np.ndarray) -> bytes:
    """A 16-byte BLAKE2b digest of the arrays' raw bytes, in order (shape and dtype are the caller's)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


class LruMemo(Generic[V]):
    """Values by key, least recently used dropped first once the summed ``cost`` exceeds ``capacity``
    (the newest value is always kept, even if it alone exceeds it).

    Args:
        capacity: the bound on the summed cost.
        cost: the cost of one value (default 1: ``capacity`` counts entries).
    """

    def __init__(self, capacity: float, cost: Callable[[V], float] = lambda value: 1) -> None:
        self.capacity = capacity
        self.cost = cost
        self.used = 0.0
        self._items: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: V) -> None:
        """Store ``value`` under ``key`` (a no-op if present), then drop the oldest values over capacity."""
        if key in self._items:
            return
        self._items[key] = value
        self.used += self.cost(value)
        while self.used > self.capacity and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.used -= self.cost(old)

    def clear(self) -> None:
        """Drop every value."""
        self._items.clear()
        self.used = 0.0
