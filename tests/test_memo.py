"""LruMemo and digest: hits, least-recently-used eviction by count and by cost, the newest value kept."""

from __future__ import annotations

import numpy as np

from mllm_ris.processing.regions import LruMemo, digest


def test_digest_depends_on_contents_and_order() -> None:
    a, b = np.arange(4, dtype=np.uint8), np.arange(4, 8, dtype=np.uint8)
    assert digest(a, b) == digest(a.copy(), b.copy()) and len(digest(a)) == 16
    assert digest(a, b) != digest(b, a) and digest(a) != digest(b)
    assert digest(np.asfortranarray(np.eye(3))) == digest(np.eye(3))  # contiguous bytes, same values


def test_lru_memo_evicts_least_recently_used() -> None:
    memo: LruMemo[str] = LruMemo(2)
    memo.put(b"a", "A")
    memo.put(b"b", "B")
    assert memo.get(b"a") == "A"  # a is now the most recent
    memo.put(b"c", "C")  # over capacity: b goes
    assert memo.get(b"b") is None and memo.get(b"a") == "A" and memo.get(b"c") == "C"
    assert len(memo) == 2 and memo.used == 2
    memo.put(b"a", "other")  # present: unchanged
    assert memo.get(b"a") == "A"
    memo.clear()
    assert len(memo) == 0 and memo.used == 0


def test_lru_memo_by_cost_keeps_the_newest() -> None:
    memo: LruMemo[bytes] = LruMemo(10, len)
    memo.put(b"1", b"x" * 6)
    memo.put(b"2", b"x" * 4)
    assert len(memo) == 2 and memo.used == 10
    memo.put(b"3", b"x" * 20)  # alone over capacity: the others go, it stays
    assert len(memo) == 1 and memo.get(b"3") is not None and memo.used == 20
