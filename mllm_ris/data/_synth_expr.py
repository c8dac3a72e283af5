"""SynthRef structured queries: their semantics, the unambiguity check, and their generation.

Every expression is generated from a *query*, a JSON-friendly dict, and kept only when
:func:`evaluate` on the scene returns exactly the intended targets. The forms:

``{"op": "attr", "desc": D}``
    the objects matching ``D`` (``simple``: exactly one; ``multi``: two or more; ``negative``:
    none). ``D = {"shape", "colour", "size"}``, each a value or None (any).
    ``extreme`` and ``size_cmp`` below select nothing when no object matches ``D`` ("the leftmost
    green star" without a green star): the ``spatial`` form of a negative.
``{"op": "extreme", "desc": D, "axis": "x"|"y", "dir": "min"|"max", "rank": 1|2}``
    the ``rank``-th of the objects matching ``D`` counted from the left (x min), right (x max),
    top (y min) or bottom (y max) by visible-pixel centroid.
``{"op": "size_cmp", "desc": D, "size": "small"|"large"}``
    the only object of that size class among the (>= 2) objects matching ``D``, all others being
    of the other class ("the larger of the two blue ones", "the smallest circle").
``{"op": "relate", "desc": D, "relations": [{"rel": R, "anchor": {"op": "attr", "desc": A}}, ...]}``
    the objects matching ``D`` that stand in every relation ``R`` (``left_of``, ``right_of``,
    ``above``, ``below``) to its anchor, each anchor being exactly one object.

Spatial judgements use the centroids with a margin ``m`` (pixels) so a human agrees at a glance:
an ordered object must be at least ``m`` from its neighbours in the order; a relation is *true*
when the centroid offset in its direction is >= ``m``, *false* when it is <= 0 and *unclear*
in between. A query is ambiguous (``evaluate`` returns None) when an order is closer than ``m``,
an anchor is not exactly one object, or a candidate is neither clearly in nor clearly out.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mllm_ris.data._synth_scene import COLOURS, SHAPES, SIZES
from mllm_ris.data._synth_text import realise

__all__ = [
    "DIFFICULTIES",
    "NEGATIVE_FORMS",
    "Expression",
    "evaluate",
    "generate_expressions",
    "negative_form",
    "query_key",
    "relation_status",
]

DIFFICULTIES: tuple[str, ...] = ("simple", "spatial", "relational", "multi", "negative")
# The forms a negative can take: an altered description ("the red star" without one), a spatial
# expression over an absent description ("the leftmost red star", "the largest red star"), or a
# relation no candidate stands in ("the circle left of the red square", every circle right of it).
NEGATIVE_FORMS: tuple[str, ...] = ("attr", "spatial", "relational")
_FORM_OF_OP: dict[str, str] = {
    "attr": "attr",
    "extreme": "spatial",
    "size_cmp": "spatial",
    "relate": "relational",
}
ATTRS: tuple[str, ...] = ("size", "colour", "shape")
_VALUES: dict[str, tuple[str, ...]] = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}
# Attribute subsets, fewest first (a description uses the attributes of one subset).
_SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    c for k in range(len(ATTRS) + 1) for c in itertools.combinations(ATTRS, k)
)
_DIRECTIONS: tuple[tuple[str, str], ...] = (("x", "min"), ("x", "max"), ("y", "min"), ("y", "max"))
_RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
_TWO_RELATION_PROB = 0.45
_MAX_MULTI_SETS = 2


class SceneItem(Protocol):
    """What the checker needs of an object: attributes and visible centroid."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Expression:
    """One generated referring expression.

    Attributes:
        text: the sentence.
        difficulty: one of :data:`DIFFICULTIES`.
        targets: indices of the referred objects (empty for a negative).
        query: the structured query the text realises (see the module docstring).
        source: for a negative, the object whose description was altered to make it.
    """

    text: str
    difficulty: str
    targets: tuple[int, ...]
    query: dict[str, Any] = field(compare=False)
    source: int | None = None


def _desc(obj: SceneItem, attrs: Sequence[str]) -> dict[str, str | None]:
    return {a: (getattr(obj, a) if a in attrs else None) for a in ATTRS}


def matches(desc: Mapping[str, str | None], obj: SceneItem) -> bool:
    """True when ``obj`` has every attribute ``desc`` names."""
    return all(v is None or getattr(obj, a) == v for a, v in desc.items())


def _n_attrs(desc: Mapping[str, str | None]) -> int:
    return sum(v is not None for v in desc.values())


def _select(desc: Mapping[str, str | None], objects: Sequence[SceneItem]) -> list[int]:
    return [i for i, o in enumerate(objects) if matches(desc, o)]


def relation_status(rel: str, obj: SceneItem, anchor: SceneItem, margin: float) -> bool | None:
    """True / False / None (unclear) for ``obj rel anchor`` by centroids with ``margin`` pixels."""
    if rel == "left_of":
        d = anchor.cx - obj.cx
    elif rel == "right_of":
        d = obj.cx - anchor.cx
    elif rel == "above":
        d = anchor.cy - obj.cy
    elif rel == "below":
        d = obj.cy - anchor.cy
    else:
        raise ValueError(f"unknown relation {rel!r}")
    if d >= margin:
        return True
    if d <= 0:
        return False
    return None


def _coord(obj: SceneItem, axis: str) -> float:
    return obj.cx if axis == "x" else obj.cy


def evaluate(query: Mapping[str, Any], objects: Sequence[SceneItem], margin: float) -> frozenset[int] | None:
    """The indices ``query`` selects in ``objects``, or None when the query is ambiguous.

    Raises:
        ValueError: an unknown ``op``.
    """
    op = query["op"]
    members = _select(query["desc"], objects)
    if op == "attr":
        return frozenset(members)
    if op in ("extreme", "size_cmp") and not members:
        return frozenset()  # nothing matches the description: nothing to order or compare
    if op == "extreme":
        rank = int(query["rank"])
        if len(members) < 2 or len(members) < rank:
            return None
        sign = 1.0 if query["dir"] == "min" else -1.0
        keys = sorted(sign * _coord(objects[i], query["axis"]) for i in members)
        chosen = [i for i in members if sign * _coord(objects[i], query["axis"]) == keys[rank - 1]]
        gaps = [keys[rank - 1] - keys[rank - 2]] if rank >= 2 else []
        gaps += [keys[rank] - keys[rank - 1]] if rank < len(keys) else []
        if len(chosen) != 1 or min(gaps) < margin:
            return None
        return frozenset(chosen)
    if op == "size_cmp":
        if len(members) < 2:
            return None
        hits = [i for i in members if objects[i].size == query["size"]]
        return frozenset(hits) if len(hits) == 1 else None
    if op == "relate":
        anchors = []
        for relation in query["relations"]:
            found = evaluate(relation["anchor"], objects, margin)
            if found is None or len(found) != 1:
                return None
            anchors.append((relation["rel"], next(iter(found))))
        selected = []
        for i in members:
            status = [relation_status(rel, objects[i], objects[a], margin) for rel, a in anchors]
            if all(s is True for s in status):
                selected.append(i)
            elif not any(s is False for s in status):
                return None  # neither clearly in nor clearly out
        return frozenset(selected)
    raise ValueError(f"unknown query op {op!r}")


def negative_form(query: Mapping[str, Any]) -> str:
    """The :data:`NEGATIVE_FORMS` entry of a query's form (``attr``, ``spatial`` or ``relational``)."""
    return _FORM_OF_OP[query["op"]]


def query_key(query: Mapping[str, Any]) -> str:
    """A canonical string of a query (equal queries, equal keys)."""
    return json.dumps(query, sort_keys=True)


def _attr_query(desc: Mapping[str, str | None]) -> dict[str, Any]:
    return {"op": "attr", "desc": dict(desc)}


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


class _Generator:
    """Builds and verifies the expressions of one scene."""

    def __init__(self, objects: Sequence[SceneItem], rng: np.random.Generator, margin: float) -> None:
        self.objects = objects
        self.rng = rng
        self.margin = margin
        # Minimal unique descriptions of every object (empty when attributes cannot single it out).
        self.unique: list[list[dict[str, str | None]]] = [
            self._minimal_unique(t) for t in range(len(objects))
        ]

    def check(self, query: Mapping[str, Any], targets: Sequence[int]) -> bool:
        """True when ``query`` is unambiguous and selects exactly ``targets``."""
        return evaluate(query, self.objects, self.margin) == frozenset(targets)

    def expression(
        self, query: dict[str, Any], difficulty: str, targets: Sequence[int], source: int | None = None
    ) -> Expression:
        """Phrase a query after checking it once more (every emitted expression is verified)."""
        if not self.check(query, targets):
            raise AssertionError(f"query {query} does not select {sorted(targets)}")
        text = realise(query, self.objects, self.rng)
        return Expression(text, difficulty, tuple(sorted(targets)), query, source)

    def _minimal_unique(self, t: int) -> list[dict[str, str | None]]:
        for k in range(1, len(ATTRS) + 1):
            found = [
                _desc(self.objects[t], attrs)
                for attrs in _SUBSETS
                if len(attrs) == k and _select(_desc(self.objects[t], attrs), self.objects) == [t]
            ]
            if found:
                return found
        return []

    def _ambiguous_descs(self, t: int) -> list[dict[str, str | None]]:
        """Descriptions matching ``t`` and at least one other object, fewest attributes first.

        Of the descriptions that select the same objects only those with the fewest attributes are
        kept ("the leftmost cross", not "the leftmost small cross" when every cross is small).
        """
        best: dict[tuple[int, ...], int] = {}
        out = []
        for attrs in _SUBSETS:  # fewest attributes first
            desc = _desc(self.objects[t], attrs)
            members = tuple(_select(desc, self.objects))
            if len(members) < 2 or best.get(members, len(attrs)) < len(attrs):
                continue
            best[members] = len(attrs)
            out.append(desc)
        return out

    def simple(self, t: int) -> Expression | None:
        if not self.unique[t]:
            return None
        return self.expression(_attr_query(_pick(self.rng, self.unique[t])), "simple", [t])

    def spatial(self, t: int) -> Expression | None:
        options: list[tuple[float, dict[str, Any]]] = []
        for desc in self._ambiguous_descs(t):
            n = len(_select(desc, self.objects))
            for (axis, direction), rank in itertools.product(_DIRECTIONS, (1, 2)):
                if rank == 2 and n < 3:
                    continue
                q = {"op": "extreme", "desc": desc, "axis": axis, "dir": direction, "rank": rank}
                if self.check(q, [t]):
                    options.append((2.0 if rank == 1 else 1.0, q))
            q = {"op": "size_cmp", "desc": desc, "size": self.objects[t].size}
            if self.check(q, [t]):
                options.append((3.0, q))
        if not options:
            return None
        weights = np.array([w for w, _ in options])
        query = options[int(self.rng.choice(len(options), p=weights / weights.sum()))][1]
        return self.expression(query, "spatial", [t])

    def relational(self, t: int) -> Expression | None:
        target = self.objects[t]
        true_rels = []  # (rel, anchor index, anchor desc) true for the target
        for a in range(len(self.objects)):
            if a == t or not self.unique[a]:
                continue
            anchor_desc = _pick(self.rng, self.unique[a])
            for rel in _RELATIONS:
                if relation_status(rel, target, self.objects[a], self.margin) is True:
                    true_rels.append((rel, a, anchor_desc))
        descs = self._ambiguous_descs(t)
        order = self.rng.permutation(len(descs))
        descs = [descs[i] for i in order if descs[i]["shape"] is not None] + [
            descs[i] for i in order if descs[i]["shape"] is None
        ]

        def relate(
            desc: dict[str, str | None], rels: Sequence[tuple[str, int, dict[str, str | None]]]
        ) -> dict[str, Any] | None:
            # the target's noun must leave >= 2 candidates besides the anchors: a relation is needed
            if len(set(_select(desc, self.objects)) - {a for _, a, _ in rels}) < 2:
                return None
            return {
                "op": "relate",
                "desc": desc,
                "relations": [{"rel": r, "anchor": _attr_query(ad)} for r, _, ad in rels],
            }

        def verified(query: dict[str, Any] | None) -> bool:
            return query is not None and self.check(query, [t])

        if self.rng.random() < _TWO_RELATION_PROB:
            for desc in descs:
                needed, redundant = [], []
                for r1, r2 in itertools.combinations(true_rels, 2):
                    if r1[1] == r2[1] and (r1[0] in ("above", "below")) == (r2[0] in ("above", "below")):
                        continue  # same anchor, same axis
                    q = relate(desc, [r1, r2])
                    if verified(q):
                        alone_ok = verified(relate(desc, [r1])) or verified(relate(desc, [r2]))
                        (redundant if alone_ok else needed).append(q)
                if needed or redundant:
                    return self.expression(_pick(self.rng, needed or redundant), "relational", [t])
        for desc in descs:
            singles = [q for q in (relate(desc, [r]) for r in true_rels) if verified(q)]
            if singles:
                return self.expression(_pick(self.rng, singles), "relational", [t])
        return None

    def multi(self) -> list[Expression]:
        by_targets: dict[tuple[int, ...], list[dict[str, str | None]]] = {}
        seen = set()
        for obj in self.objects:
            for attrs in _SUBSETS[1:]:
                desc = _desc(obj, attrs)
                key = tuple(sorted((k, v) for k, v in desc.items() if v is not None))
                if key in seen:
                    continue
                seen.add(key)
                members = tuple(_select(desc, self.objects))
                if len(members) >= 2:
                    by_targets.setdefault(members, []).append(desc)
        for members, descs in by_targets.items():  # keep the descriptions with the fewest attributes
            fewest = min(_n_attrs(d) for d in descs)
            by_targets[members] = [d for d in descs if _n_attrs(d) == fewest]
        sets = sorted(by_targets)
        out = []
        for i in self.rng.permutation(len(sets))[:_MAX_MULTI_SETS]:
            targets = sets[int(i)]
            descs = by_targets[targets]
            for j in self.rng.permutation(len(descs))[: min(2, len(descs))]:
                out.append(self.expression(_attr_query(descs[int(j)]), "multi", targets))
        return out

    def _absent_descs(self, source: int) -> list[tuple[float, dict[str, str | None]]]:
        """Descriptions of ``source`` with one attribute changed that match no object, weighted
        (two attributes 3, else 1; size alone never: "the large one" is not an object kind)."""
        obj = self.objects[source]
        options: list[tuple[float, dict[str, str | None]]] = []
        for changed in ATTRS:
            for value in _VALUES[changed]:
                if value == getattr(obj, changed):
                    continue
                for attrs in _SUBSETS[1:]:
                    if changed not in attrs or attrs == ("size",):
                        continue
                    desc = _desc(obj, attrs)
                    desc[changed] = value
                    if not _select(desc, self.objects):
                        options.append((3.0 if len(attrs) == 2 else 1.0, desc))
        return options

    def _first_unused(
        self, options: Sequence[tuple[float, dict[str, Any]]], source: int, avoid: set[str]
    ) -> Expression | None:
        """A weighted draw of up to 4 of the negative ``options`` (weight, query); the first whose key is
        not in ``avoid`` is added to it and phrased."""
        if not options:
            return None
        weights = np.array([w for w, _ in options])
        for i in self.rng.choice(
            len(options), size=min(4, len(options)), replace=False, p=weights / weights.sum()
        ):
            query = options[int(i)][1]
            if query_key(query) not in avoid:
                avoid.add(query_key(query))
                return self.expression(query, "negative", [], source=source)
        return None

    def negative(self, source: int, avoid: set[str]) -> Expression | None:
        """An absent object made by changing one attribute of ``source`` (the ``attr`` form).

        ``avoid`` holds the keys (:func:`query_key`) of queries already used; the new one is added.
        """
        options = [(w, _attr_query(d)) for w, d in self._absent_descs(source)]
        return self._first_unused(options, source, avoid)

    def negative_spatial(self, source: int, avoid: set[str]) -> Expression | None:
        """The ``spatial`` form: an ordering or size comparison over an absent description made from
        ``source`` ("the leftmost red star", "the largest red star" when there is no red star)."""
        options: list[tuple[float, dict[str, Any]]] = []
        for weight, desc in self._absent_descs(source):
            if desc["size"] is not None:
                desc = {**desc, "size": None}  # "the largest small star" reads wrong
                if (desc["shape"] is None and desc["colour"] is None) or _select(desc, self.objects):
                    continue
            for axis, direction in _DIRECTIONS:
                q = {"op": "extreme", "desc": desc, "axis": axis, "dir": direction, "rank": 1}
                options.append((weight / len(_DIRECTIONS), q))
            for size in SIZES:
                options.append((weight / len(SIZES), {"op": "size_cmp", "desc": desc, "size": size}))
        return self._first_unused(options, source, avoid)

    def negative_relational(self, source: int, avoid: set[str]) -> Expression | None:
        """The ``relational`` form: ``source``'s kind in a relation to a present anchor that no
        object of that kind stands in ("the circle left of the red square", every circle clearly
        right of it): the words are all true of the scene, only their combination is not."""
        options: list[tuple[float, dict[str, Any]]] = []
        descs = [d for d in self._ambiguous_descs(source) + self.unique[source] if d["shape"] is not None]
        for desc in descs:
            for a in range(len(self.objects)):
                if a == source or not self.unique[a] or matches(desc, self.objects[a]):
                    continue  # the anchor is not one of the candidates ("the square left of the square")
                anchor = _attr_query(self.unique[a][0])
                for rel in _RELATIONS:
                    q = {"op": "relate", "desc": desc, "relations": [{"rel": rel, "anchor": anchor}]}
                    if self.check(q, []):
                        options.append((1.0, q))
        return self._first_unused(options, source, avoid)


def generate_expressions(
    objects: Sequence[SceneItem],
    rng: np.random.Generator,
    margin: float,
    negative_forms: Sequence[str] = ("attr",),
) -> list[Expression]:
    """All verified expressions of one scene.

    Per object: one ``simple`` (when attributes can single it out), one ``spatial`` and one
    ``relational`` (when the scene allows one); per scene: up to two target sets of ``multi``
    expressions (one or two phrasings each) and one or two ``negative`` ones, each altering the
    description of an object that has a positive expression.

    Args:
        objects: the scene's objects (attributes + visible centroids).
        rng: the only source of randomness.
        margin: spatial margin in pixels.
        negative_forms: the :data:`NEGATIVE_FORMS` negatives are drawn from, uniformly per negative
            (a form the scene cannot make falls back to ``attr``); ``("attr",)`` draws exactly as
            SynthRef builds made before the other forms existed.

    Returns:
        the expressions, objects in order, then multi, then negatives.

    Raises:
        ValueError: an unknown or empty ``negative_forms``.
    """
    unknown = sorted(set(negative_forms) - set(NEGATIVE_FORMS))
    if unknown or not negative_forms:
        raise ValueError(f"negative_forms: {list(negative_forms)}; choose from {list(NEGATIVE_FORMS)}")
    gen = _Generator(objects, rng, margin)
    out: list[Expression] = []
    for t in range(len(objects)):
        for make in (gen.simple, gen.spatial, gen.relational):
            expr = make(t)
            if expr is not None:
                out.append(expr)
    out.extend(gen.multi())
    referred = sorted({e.targets[0] for e in out if len(e.targets) == 1})
    used: set[str] = set()
    n_negatives = min(len(referred), int(rng.integers(1, 3)))
    makers = {"attr": gen.negative, "spatial": gen.negative_spatial, "relational": gen.negative_relational}
    for i in rng.permutation(len(referred))[:n_negatives]:
        source = referred[int(i)]
        form = negative_forms[0] if len(negative_forms) == 1 else _pick(rng, negative_forms)
        expr = makers[form](source, used)
        if expr is None and form != "attr":
            expr = gen.negative(source, used)
        if expr is not None:
            out.append(expr)
    return out
