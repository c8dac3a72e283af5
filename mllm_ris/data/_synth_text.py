"""SynthRef phrasing: turn a structured query (see ``_synth_expr``) into an English sentence.

Each query form has several templates and the descriptions have synonyms for the generic noun
("shape" / "object" / "one"), so the same query reads differently across samples. The text never
adds information the query lacks: the checker's verdict on the query is the verdict on the text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["noun_phrase", "realise", "tokenize"]

_PLURALS: dict[str, str] = {"cross": "crosses"}
_NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

_SIMPLE = ("the {np}", "{np}", "the {np} in the image", "the {np} in the picture")
_EXTREME: dict[tuple[str, str, int], tuple[str, ...]] = {
    ("x", "min", 1): (
        "the leftmost {np}",
        "leftmost {np}",
        "the {np} on the far left",
        "the {np} furthest to the left",
    ),
    ("x", "max", 1): (
        "the rightmost {np}",
        "rightmost {np}",
        "the {np} on the far right",
        "the {np} furthest to the right",
    ),
    ("y", "min", 1): (
        "the topmost {np}",
        "the highest {np}",
        "the uppermost {np}",
        "the {np} closest to the top",
    ),
    ("y", "max", 1): ("the bottommost {np}", "the lowest {np}", "the {np} closest to the bottom"),
    ("x", "min", 2): ("the second {np} from the left", "the second leftmost {np}"),
    ("x", "max", 2): ("the second {np} from the right", "the second rightmost {np}"),
    ("y", "min", 2): ("the second {np} from the top", "the second highest {np}"),
    ("y", "max", 2): ("the second {np} from the bottom", "the second lowest {np}"),
}
_SIZE_CMP_TWO: dict[str, tuple[str, ...]] = {
    "large": (
        "the larger of the two {nps}",
        "the bigger of the two {nps}",
        "the larger {np}",
        "the bigger {np}",
    ),
    "small": ("the smaller of the two {nps}", "the smaller {np}"),
}
_SIZE_CMP_MANY: dict[str, tuple[str, ...]] = {
    "large": ("the largest {np}", "the biggest {np}"),
    "small": ("the smallest {np}", "the tiniest {np}"),
}
_REL_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# The same relation words when two relations share an anchor ("below and to the left of X").
_REL_SHARED: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of"),
    "right_of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
_MULTI = ("all {nps}", "all the {nps}", "every {np}", "each {np}", "the {count} {nps}")
_MULTI_TWO = ("both {nps}", "the two {nps}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(desc: Mapping[str, str | None], rng: np.random.Generator, *, plural: bool = False) -> str:
    """``small red circle`` / ``red ones`` / ``shapes`` for a description (no article)."""
    adjectives = [v for v in (desc.get("size"), desc.get("colour")) if v is not None]
    shape = desc.get("shape")
    if shape is not None:
        noun = _PLURALS.get(shape, shape + "s") if plural else shape
    elif plural:
        noun = _pick(rng, ("shapes", "objects", "ones") if adjectives else ("shapes", "objects"))
    else:
        noun = _pick(rng, ("shape", "object", "one") if adjectives else ("shape", "object"))
    return " ".join([*adjectives, noun])


def _members(desc: Mapping[str, str | None], objects: Sequence[Any]) -> int:
    return sum(all(v is None or getattr(o, a) == v for a, v in desc.items()) for o in objects)


def _simple(desc: Mapping[str, str | None], rng: np.random.Generator) -> str:
    adjectives = [v for v in (desc.get("size"), desc.get("colour")) if v is not None]
    if desc.get("shape") is not None and adjectives and rng.random() < 0.25:
        return f"the {desc['shape']} that is {' and '.join(adjectives)}"
    return _pick(rng, _SIMPLE).format(np=noun_phrase(desc, rng))


def _relational(query: Mapping[str, Any], rng: np.random.Generator) -> str:
    head = f"the {noun_phrase(query['desc'], rng)}"
    if rng.random() < 0.3:
        head += _pick(rng, (" that is", " located"))
    rels = query["relations"]
    anchors = [f"the {noun_phrase(r['anchor']['desc'], rng)}" for r in rels]
    if len(rels) == 2 and rels[0]["anchor"] == rels[1]["anchor"]:
        # one anchor, two axes: vertical word first ("below and to the left of the star")
        words = sorted((r["rel"] for r in rels), key=lambda r: r not in ("above", "below"))
        first, second = _pick(rng, _REL_SHARED[words[0]]), _pick(rng, _REL_SHARED[words[1]])
        return f"{head} {first} and {second} {anchors[0]}"
    parts = [f"{_pick(rng, _REL_WORDS[r['rel']])} {a}" for r, a in zip(rels, anchors, strict=True)]
    return f"{head} {' and '.join(parts)}"


def realise(query: Mapping[str, Any], objects: Sequence[Any], rng: np.random.Generator) -> str:
    """One English sentence for ``query`` (lower case, words separated by single spaces).

    Args:
        query: a structured query (``op`` attr / extreme / size_cmp / relate).
        objects: the scene's objects (for counts: "the two circles", "the larger of the two").
        rng: picks the template and synonyms.
    """
    op = query["op"]
    desc = query["desc"]
    if op == "attr":
        n = _members(desc, objects)
        if n < 2:
            return _simple(desc, rng)
        templates = _MULTI + _MULTI_TWO if n == 2 else _MULTI
        return _pick(rng, templates).format(
            np=noun_phrase(desc, rng), nps=noun_phrase(desc, rng, plural=True), count=_NUMBERS.get(n, str(n))
        )
    if op == "extreme":
        template = _pick(rng, _EXTREME[(query["axis"], query["dir"], int(query["rank"]))])
        return template.format(np=noun_phrase(desc, rng))
    if op == "size_cmp":
        table = _SIZE_CMP_TWO if _members(desc, objects) == 2 else _SIZE_CMP_MANY
        return _pick(rng, table[query["size"]]).format(
            np=noun_phrase(desc, rng), nps=noun_phrase(desc, rng, plural=True)
        )
    if op == "relate":
        return _relational(query, rng)
    raise ValueError(f"unknown query op {op!r}")


def tokenize(text: str) -> list[str]:
    """The refer-style token list of a sentence (lower-cased words)."""
    return text.lower().split()
