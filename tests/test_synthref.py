"""SynthRef: layout, determinism, loaders, masks and an independent check of every expression."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mllm_ris.data import build_dataset
from mllm_ris.data._synth_expr import NEGATIVE_FORMS, evaluate, negative_form
from mllm_ris.data._synth_scene import COLOURS, ObjectSpec, draw_scene
from mllm_ris.data.images import read_image
from mllm_ris.data.refer import ReferDataset
from mllm_ris.data.synthetic import SynthRefDataset, make_synthref
from mllm_ris.errors import ConfigError, DatasetError

# pycocotools' decode warns under numpy 2 (its __array__ lacks ``copy``); harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

IMAGES, SEED, SIZE = 24, 7, 80
DIFFICULTIES = {"simple", "spatial", "relational", "multi", "negative"}
ANNOTATION_FILES = [
    "grefcoco/grefs(unc).json",
    "grefcoco/instances.json",
    "synthref/refs(unc).p",
    "synthref/instances.json",
    "rrefcoco/refs(unc).p",
    "rrefcoco/instances.json",
    "synthref_meta.json",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthref") / "a"
    make_synthref(out, images=IMAGES, seed=SEED, size=SIZE, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def grefs(built: Path) -> list[dict[str, Any]]:
    return json.loads((built / "grefcoco" / "grefs(unc).json").read_text())


@pytest.fixture(scope="module")
def instances(built: Path) -> dict[str, Any]:
    return json.loads((built / "grefcoco" / "instances.json").read_text())


@pytest.fixture(scope="module")
def meta(built: Path) -> dict[str, Any]:
    return json.loads((built / "synthref_meta.json").read_text())


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(rle: dict[str, Any]) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


# ---------------------------------------------------------------- layout and determinism


def test_layout(built: Path, meta: dict[str, Any], instances: dict[str, Any]) -> None:
    for rel in ANNOTATION_FILES:
        assert (built / rel).is_file(), rel
    pngs = sorted((built / "images" / "mscoco" / "images" / "train2014").glob("*.png"))
    assert len(pngs) == IMAGES
    assert [im["file_name"] for im in instances["images"]] == [p.name for p in pngs]
    assert read_image(pngs[0]).shape == (SIZE, SIZE, 3)
    assert (meta["seed"], meta["images"], meta["size"]) == (SEED, IMAGES, SIZE)
    # every layout folder carries the same instances file
    same = {(built / d / "instances.json").read_bytes() for d in ("grefcoco", "synthref", "rrefcoco")}
    assert len(same) == 1
    splits = meta["counts"]["splits"]
    assert {s: splits[s]["images"] for s in splits} == {"train": 20, "val": 2, "test": 2}


def test_same_seed_same_bytes_for_any_worker_count(built: Path, tmp_path: Path) -> None:
    make_synthref(tmp_path / "b", images=IMAGES, seed=SEED, size=SIZE, workers=2, progress=False)
    a, b = _tree(built), _tree(tmp_path / "b")
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert differing == []


def test_other_seed_other_data(built: Path, tmp_path: Path) -> None:
    make_synthref(tmp_path / "c", images=IMAGES, seed=SEED + 1, size=SIZE, workers=1, progress=False)
    a, c = _tree(built), _tree(tmp_path / "c")
    assert a["grefcoco/grefs(unc).json"] != c["grefcoco/grefs(unc).json"]
    png = "images/mscoco/images/train2014/synthref_00000001.png"
    assert a[png] != c[png]


def test_splits_are_by_image(grefs: list[dict[str, Any]]) -> None:
    split_of: dict[int, set[str]] = {}
    for ref in grefs:
        split_of.setdefault(ref["image_id"], set()).add(ref["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert set().union(*split_of.values()) == {"train", "val", "test"}


# ---------------------------------------------------------------- loaders


def test_every_difficulty_and_target_count(built: Path, meta: dict[str, Any]) -> None:
    ds = SynthRefDataset(built)
    assert ds.name == "synthref"
    seen: Counter[str] = Counter()
    for sample in ds:
        seen[sample.difficulty] += 1
        t = sample.masks.shape[0]
        if sample.difficulty == "negative":
            assert t == 0 and not sample.exist
        elif sample.difficulty == "multi":
            assert t >= 2 and sample.exist
        else:
            assert t == 1 and sample.exist
        assert sample.dataset == "synthref"
    assert set(seen) == DIFFICULTIES
    assert dict(seen) == {k: v for k, v in meta["counts"]["sentences"].items() if v}


def test_split_filter_and_registry(built: Path, meta: dict[str, Any]) -> None:
    for split in ("train", "val", "test"):
        ds = build_dataset("synthref", built, split)
        assert isinstance(ds, SynthRefDataset)
        assert {r.split for r in ds.refs} == {split}
        assert len(ds) == sum(meta["counts"]["splits"][split]["sentences"].values())


def test_layouts_agree(built: Path, meta: dict[str, Any], tmp_path: Path) -> None:
    full = SynthRefDataset(built)
    refer = ReferDataset(built, dataset="synthref", split_by="unc")
    robust = ReferDataset(built, dataset="rrefcoco")
    full_by_sent = {s.sent_id: s for s in full}
    counts = meta["counts"]
    single = {"simple", "spatial", "relational"}
    assert (
        len(refer)
        == sum(counts["sentences"][d] for d in single)
        == counts["layouts"]["synthref"]["sentences"]
    )
    assert len(robust) == len(refer) + counts["sentences"]["negative"]
    assert len(full) == sum(counts["sentences"].values())
    assert len(refer.refs) == len(robust.refs) == counts["refs"]["single"]
    for sample in refer:  # same sentence, text, targets in both layouts
        twin = full_by_sent[sample.sent_id]
        assert (twin.text, twin.ref_id, twin.difficulty) == (sample.text, sample.ref_id, sample.difficulty)
        assert np.array_equal(twin.masks, sample.masks)
    negatives = [s for s in robust if not s.exist]
    assert {s.sent_id for s in negatives} == {s.sent_id for s in full if s.difficulty == "negative"}
    assert all(s.masks.shape[0] == 0 and s.difficulty == "negative" for s in negatives)


# ---------------------------------------------------------------- masks


def test_masks_equal_instances_rle(built: Path, instances: dict[str, Any]) -> None:
    anns = {a["id"]: a for a in instances["annotations"]}
    ds = SynthRefDataset(built)
    targets = {ref.ref_id: ref.target_ids for ref in ds.refs}
    positives = [s for s in ds if s.exist]
    assert len(positives) == len(ds) - sum(s.difficulty == "negative" for s in ds) > 0
    for sample in positives:
        ann_ids = targets[sample.ref_id]
        assert sample.masks.shape[0] == len(ann_ids) >= 1
        for mask, ann_id in zip(sample.masks, ann_ids, strict=True):
            assert mask.any()
            assert np.array_equal(mask, _decode(anns[ann_id]["segmentation"]))
            assert int(mask.sum()) == anns[ann_id]["area"]


def _palette_name(pixels: np.ndarray) -> np.ndarray:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    dist = np.linalg.norm(pixels[:, None, :].astype(np.float64) - palette[None], axis=2)
    return np.array(names)[dist.argmin(axis=1)]


def test_masks_are_the_visible_pixels(built: Path, instances: dict[str, Any]) -> None:
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    image_dir = built / "images" / "mscoco" / "images" / "train2014"
    occluded = 0
    for image in instances["images"]:
        pixels = read_image(image_dir / image["file_name"])
        masks = [_decode(a["segmentation"]) for a in by_image[image["id"]]]
        assert (np.sum(masks, axis=0) <= 1).all()  # visible parts never overlap
        for ann, mask in zip(by_image[image["id"]], masks, strict=True):
            named = _palette_name(pixels[mask])
            assert (named == ann["attributes"]["colour"]).mean() > 0.95
            assert ann["visible_fraction"] >= 0.6
            occluded += ann["visible_fraction"] < 1.0
        background = pixels[~np.any(masks, axis=0)].astype(int)
        saturation = background.max(axis=1) - background.min(axis=1)
        assert (saturation < 80).mean() > 0.99  # no object-coloured pixel outside the masks
    assert occluded > 0


def test_occluded_mask_excludes_occluder() -> None:
    under = ObjectSpec("square", "red", "large", 30.0, 30.0, 12.0, 0.0, COLOURS["red"])
    over = ObjectSpec("circle", "blue", "small", 40.0, 40.0, 6.0, 0.0, COLOURS["blue"])
    alone = draw_scene([under], 64, np.random.default_rng(0)).objects[0].mask
    scene = draw_scene([under, over], 64, np.random.default_rng(0))
    bottom, top = scene.objects
    assert (alone & top.mask).any()  # they do overlap
    assert not (bottom.mask & top.mask).any()
    assert np.array_equal(bottom.mask, alone & ~top.mask)
    assert bottom.full_area == int(alone.sum()) > bottom.area


# ---------------------------------------------------------------- expressions


class _Obj:
    def __init__(self, ann: dict[str, Any]) -> None:
        self.ann_id = ann["id"]
        self.attrs = ann["attributes"]
        ys, xs = np.nonzero(_decode(ann["segmentation"]))
        self.x, self.y = float(xs.mean()), float(ys.mean())


def _matching(desc: dict[str, Any], objs: list[_Obj]) -> list[_Obj]:
    return [o for o in objs if all(v is None or o.attrs[k] == v for k, v in desc.items())]


def _offset(rel: str, o: _Obj, a: _Obj) -> float:
    return {"left_of": a.x - o.x, "right_of": o.x - a.x, "above": a.y - o.y, "below": o.y - a.y}[rel]


def _independent_check(query: dict[str, Any], objs: list[_Obj], m: float) -> set[int]:
    """Re-implementation of the documented semantics; asserts the query is unambiguous."""
    members = _matching(query["desc"], objs)
    op = query["op"]
    if op == "attr":
        return {o.ann_id for o in members}
    if op in ("extreme", "size_cmp") and not members:  # a spatial negative: nothing to order
        return set()
    if op == "extreme":
        sign = 1.0 if query["dir"] == "min" else -1.0
        ranked = sorted(members, key=lambda o: sign * (o.x if query["axis"] == "x" else o.y))
        keys = [sign * (o.x if query["axis"] == "x" else o.y) for o in ranked]
        r = query["rank"] - 1
        assert len(ranked) >= max(2, r + 1)
        neighbours = [keys[r - 1]] if r > 0 else []
        neighbours += [keys[r + 1]] if r + 1 < len(keys) else []
        assert all(abs(keys[r] - k) >= m for k in neighbours), "ordinal closer than the margin"
        return {ranked[r].ann_id}
    if op == "size_cmp":
        assert len(members) >= 2
        hits = [o for o in members if o.attrs["size"] == query["size"]]
        assert len(hits) == 1
        return {hits[0].ann_id}
    assert op == "relate"
    anchors = []
    for rel in query["relations"]:
        found = _matching(rel["anchor"]["desc"], objs)
        assert len(found) == 1, "anchor not unique"
        anchors.append((rel["rel"], found[0]))
    selected = set()
    for o in members:
        offsets = [_offset(rel, o, a) for rel, a in anchors]
        if all(d >= m for d in offsets):
            selected.add(o.ann_id)
        else:
            assert any(d <= 0 for d in offsets), "a candidate is neither clearly in nor clearly out"
    return selected


def test_every_query_selects_exactly_its_targets(
    grefs: list[dict[str, Any]], instances: dict[str, Any], meta: dict[str, Any]
) -> None:
    _check_every_query(grefs, instances, meta)


def _check_every_query(
    grefs: list[dict[str, Any]], instances: dict[str, Any], meta: dict[str, Any]
) -> Counter[str]:
    """Every sentence's query, re-evaluated independently, selects exactly its ref's objects; returns
    the negatives counted by form."""
    objs: dict[int, list[_Obj]] = {}
    for ann in instances["annotations"]:
        objs.setdefault(ann["image_id"], []).append(_Obj(ann))
    checked, forms = Counter(), Counter()
    for ref in grefs:
        expected = set() if ref["no_target"] else set(ref["ann_id"])
        for sent in ref["sentences"]:
            got = _independent_check(sent["query"], objs[ref["image_id"]], meta["margin_px"])
            assert got == expected, (sent["sent"], sent["query"])
            checked[sent["difficulty"]] += 1
            if sent["difficulty"] == "relational":
                assert len(_matching(sent["query"]["desc"], objs[ref["image_id"]])) >= 2
            if sent["difficulty"] == "negative":
                forms[negative_form(sent["query"])] += 1
    assert set(checked) == DIFFICULTIES
    return forms


def test_negatives_of_every_form(tmp_path: Path, grefs: list[dict[str, Any]], built: Path) -> None:
    """negative_forms: the default builds only attr-form negatives, byte for byte as before the option;
    with every form, the spatial and relational negatives are generated, verified absent by the
    independent checker, and their words are all true of the scene for the relational form."""
    default_forms = Counter(
        negative_form(s["query"]) for r in grefs for s in r["sentences"] if s["difficulty"] == "negative"
    )
    assert set(default_forms) == {"attr"}
    attr_only = tmp_path / "attr"
    make_synthref(
        attr_only, images=IMAGES, seed=SEED, size=SIZE, workers=1, progress=False, negative_forms=["attr"]
    )
    assert _tree(attr_only) == _tree(built)
    every = tmp_path / "every"
    make_synthref(
        every, images=IMAGES, seed=SEED, size=SIZE, workers=1, progress=False, negative_forms=NEGATIVE_FORMS
    )
    meta = json.loads((every / "synthref_meta.json").read_text())
    assert meta["negative_forms"] == list(NEGATIVE_FORMS)
    every_grefs = json.loads((every / "grefcoco" / "grefs(unc).json").read_text())
    every_instances = json.loads((every / "grefcoco" / "instances.json").read_text())
    forms = _check_every_query(every_grefs, every_instances, meta)
    assert set(forms) == set(NEGATIVE_FORMS), forms
    for ref in every_grefs:  # a relational negative's kind and anchor both exist in the scene
        objs = [_Obj(a) for a in every_instances["annotations"] if a["image_id"] == ref["image_id"]]
        for sent in ref["sentences"]:
            if sent["difficulty"] == "negative" and negative_form(sent["query"]) == "relational":
                assert _matching(sent["query"]["desc"], objs)
                assert len(_matching(sent["query"]["relations"][0]["anchor"]["desc"], objs)) == 1
    with pytest.raises(ConfigError, match="negative_forms"):
        make_synthref(tmp_path / "bad", images=2, seed=0, size=64, progress=False, negative_forms=["size"])


def test_text_names_the_query_attributes(grefs: list[dict[str, Any]]) -> None:
    for ref in grefs:
        for sent in ref["sentences"]:
            query = sent["query"]
            descs = [query["desc"]] + [r["anchor"]["desc"] for r in query.get("relations", [])]
            words = set(sent["tokens"])
            for desc in descs:
                for value in desc.values():
                    if value is not None:
                        assert value in words or value + "s" in words or value + "es" in words, sent["sent"]
            assert sent["tokens"] == sent["sent"].split() and sent["raw"] == sent["sent"]


class _Item:
    """A hand-placed object for the generator's own checker."""

    def __init__(self, shape: str, cx: float, cy: float) -> None:
        self.shape, self.colour, self.size, self.cx, self.cy = shape, "red", "small", cx, cy


def test_checker_rejects_ambiguous_queries() -> None:
    desc = {"shape": "circle", "colour": None, "size": None}
    leftmost = {"op": "extreme", "desc": desc, "axis": "x", "dir": "min", "rank": 1}
    assert evaluate(leftmost, [_Item("circle", 10, 10), _Item("circle", 30, 10)], 10.0) == {0}
    assert evaluate(leftmost, [_Item("circle", 10, 10), _Item("circle", 15, 10)], 10.0) is None
    anchor = {"op": "attr", "desc": {"shape": "star", "colour": None, "size": None}}
    left_of = {"op": "relate", "desc": desc, "relations": [{"rel": "left_of", "anchor": anchor}]}
    clear = [_Item("circle", 10, 10), _Item("circle", 60, 10), _Item("star", 40, 10)]
    assert evaluate(left_of, clear, 10.0) == {0}
    unclear = [_Item("circle", 10, 10), _Item("circle", 35, 10), _Item("star", 40, 10)]  # 5 px left: unclear
    assert evaluate(left_of, unclear, 10.0) is None
    two_stars = [*clear, _Item("star", 80, 10)]
    assert evaluate(left_of, two_stars, 10.0) is None  # anchor not unique


# ---------------------------------------------------------------- arguments and rebuilds


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="images"):
        make_synthref(tmp_path / "x", images=0, seed=0, size=64, progress=False)
    with pytest.raises(ConfigError, match="size"):
        make_synthref(tmp_path / "x", images=2, seed=0, size=16, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not synthref")
    with pytest.raises(DatasetError, match="not empty"):
        make_synthref(foreign, images=2, seed=0, size=64, progress=False)
    with pytest.raises(DatasetError, match="not a SynthRef"):
        SynthRefDataset(foreign)


def test_rebuild_in_place_replaces_previous(tmp_path: Path) -> None:
    out = tmp_path / "re"
    make_synthref(out, images=6, seed=1, size=64, progress=False)
    summary = make_synthref(out, images=3, seed=2, size=64, progress=False)
    assert len(list((out / "images" / "mscoco" / "images" / "train2014").glob("*.png"))) == 3
    ds = SynthRefDataset(out)
    assert ds.meta["seed"] == 2 and len(ds) == summary.sentences
