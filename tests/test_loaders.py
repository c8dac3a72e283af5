"""Dataset loaders on tiny fixtures in the exact on-disk layouts (see dataset_fixtures.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dataset_fixtures import (
    FixtureInfo,
    make_grefcoco,
    make_jsonl,
    make_reasonseg,
    make_refclef,
    make_refer,
    make_riscq,
    make_rrefcoco,
)
from PIL import Image

from mllm_ris.data import DATASET_NAMES, ReferringDataset, build_dataset
from mllm_ris.data._loading import image_size
from mllm_ris.data.grefcoco import GRefCOCODataset
from mllm_ris.data.images import read_image
from mllm_ris.data.jsonl import JsonlDataset
from mllm_ris.data.reasonseg import ReasonSegDataset
from mllm_ris.data.refer import ReferDataset
from mllm_ris.data.riscq import RISCQDataset
from mllm_ris.errors import DatasetError

FIXTURES: dict[str, Callable[[Path], FixtureInfo]] = {
    "refcoco": make_refer,
    "refcoco_google": lambda root: make_refer(root, "refcoco", "google"),
    "rrefcoco": make_rrefcoco,
    "refclef": make_refclef,
    "refclef_berkeley": lambda root: make_refclef(root, "berkeley"),
    "grefcoco": make_grefcoco,
    "riscq": make_riscq,
    "reasonseg": make_reasonseg,
    "jsonl": make_jsonl,
}


@pytest.fixture(params=list(FIXTURES), ids=list(FIXTURES))
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[FixtureInfo, ReferringDataset]:
    info = FIXTURES[request.param](tmp_path)
    return info, build_dataset(info.name, info.root, split_by=info.split_by)


def test_counts(opened: tuple[FixtureInfo, ReferringDataset]) -> None:
    info, ds = opened
    samples = list(ds)
    assert len(ds) == info.samples
    assert len(ds.refs) == info.refs
    assert len({r.image_path for r in ds.refs}) == info.images
    assert sum(r.no_target for r in ds.refs) == info.no_target
    assert sum(len(r.target_ids) for r in ds.refs) == info.instances
    assert sum(s.exist for s in samples) == info.sentences
    assert sum(not s.exist for s in samples) == info.negatives
    assert {split: sum(s.split == split for s in samples) for split in info.splits} == info.splits


def test_samples_match_what_the_fixture_drew(opened: tuple[FixtureInfo, ReferringDataset]) -> None:
    info, ds = opened
    for i in range(len(ds)):
        s = ds[i]
        ref = ds.refs[ds._index[i][0]]
        h, w = ref.height, ref.width
        assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8 and s.image.any()
        assert s.masks.dtype == bool and s.masks.ndim == 3 and s.masks.shape[1:] == (h, w)
        expected = info.masks[s.ref_id] if s.exist else np.zeros((0, h, w), dtype=bool)
        assert s.masks.shape == expected.shape
        assert np.array_equal(s.masks, expected), f"{info.name} ref {s.ref_id}: mask differs"
        assert s.exist == (s.masks.shape[0] > 0) and s.no_target == (not s.exist)
        assert s.dataset == info.name and s.split in info.splits
        assert isinstance(s.text, str) and s.text
        assert s.target.shape == (h, w)
        if info.ignore:
            assert s.ignore is not None and s.ignore.dtype == bool
            assert np.array_equal(s.ignore, info.ignore[s.ref_id])
        else:
            assert s.ignore is None
    assert len({(s.ref_id, s.sent_id) for s in ds}) == len(ds)


def test_split_filter(opened: tuple[FixtureInfo, ReferringDataset]) -> None:
    info, _ = opened
    for split, n in info.splits.items():
        ds = build_dataset(info.name, info.root, split, split_by=info.split_by)
        assert len(ds) == n and ds.split == split
        assert all(r.split == split for r in ds.refs)


def test_unknown_split_lists_the_present_ones(opened: tuple[FixtureInfo, ReferringDataset]) -> None:
    info, _ = opened
    with pytest.raises(DatasetError) as err:
        build_dataset(info.name, info.root, "nosuchsplit", split_by=info.split_by)
    assert "nosuchsplit" in str(err.value)
    for split in info.splits:
        assert split in str(err.value)


# ----------------------------------------------------------------------------- refer layout


def test_refer_reads_instances_file_name_and_sentence_fallbacks(tmp_path: Path) -> None:
    make_refer(tmp_path)
    ds = ReferDataset(tmp_path, dataset="refcoco")
    assert ds.split_by == "unc"
    ref1 = next(r for r in ds.refs if r.ref_id == 1)
    # The ref's own file_name has an "_101" suffix; the image comes from instances.json.
    assert ref1.image_path.name == "COCO_train2014_000000000001.jpg"
    assert [s.text for s in ref1.sentences] == ["left red box", "box on the left"]  # 2nd: raw only
    assert [s.sent_id for s in ref1.sentences] == [1000, 1001]
    assert (ref1.height, ref1.width) == (32, 48)
    two_part = next(s for s in ds if s.ref_id == 2)
    assert two_part.masks.shape == (1, 32, 48)
    assert two_part.masks[0, 8:14, 24:40].all() and two_part.masks[0, 20:30, 26:44].all()
    assert not two_part.masks[0, 15:19].any()  # the gap between the two parts


@pytest.mark.parametrize(
    ("dataset", "split_by"), [("refcoco+", "unc"), ("refcocog", "umd"), ("rrefcocog", "umd")]
)
def test_refer_default_split_by(tmp_path: Path, dataset: str, split_by: str) -> None:
    info = make_refer(tmp_path, dataset, split_by)
    ds = ReferDataset(tmp_path, dataset=dataset)
    assert ds.split_by == split_by and len(ds) == info.samples and ds.name == dataset


@pytest.mark.parametrize(
    ("dataset", "split_by", "valid"),
    [
        ("refcoco+", "google", "unc"),
        ("refcocog", "unc", "umd, google"),
        ("refclef", "google", "unc, berkeley"),
    ],
)
def test_refer_wrong_split_by_lists_the_valid_ones(
    tmp_path: Path, dataset: str, split_by: str, valid: str
) -> None:
    with pytest.raises(
        DatasetError, match=f"splitBy '{split_by}' is not valid for {dataset}.*valid: {valid}"
    ):
        ReferDataset(tmp_path, dataset=dataset, split_by=split_by)


def test_refer_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown refer dataset 'refcocoz'"):
        ReferDataset(tmp_path, dataset="refcocoz", split_by="unc")


def test_refer_pickle_is_protocol_2_like_the_real_ones(tmp_path: Path) -> None:
    make_refer(tmp_path)
    assert (tmp_path / "refcoco" / "refs(unc).p").read_bytes()[:2] == b"\x80\x02"


def test_rrefcoco_negative_sentences(tmp_path: Path) -> None:
    make_rrefcoco(tmp_path)
    ds = ReferDataset(tmp_path, dataset="rrefcoco")
    negatives = [s for s in ds if not s.exist]
    assert {s.ref_id for s in negatives} == {1, 3}
    assert all(s.masks.shape == (0, *s.image.shape[:2]) and not s.target.any() for s in negatives)
    ref1 = next(r for r in ds.refs if r.ref_id == 1)
    assert [s.exist for s in ref1.sentences] == [True, True, False]
    assert not ref1.no_target  # the ref has a target; only its negative sentence has none


def test_refclef_rle_forms_and_split_by(tmp_path: Path) -> None:
    make_refclef(tmp_path)
    unc = ReferDataset(tmp_path, dataset="refclef")
    berkeley = ReferDataset(tmp_path, dataset="refclef", split_by="berkeley")
    assert {r.split for r in unc.refs} == {"train", "val", "testB"}
    assert {r.split for r in berkeley.refs} == {"train", "val", "test"}
    assert unc.refs[0].image_path == tmp_path / "images" / "saiapr_tc-12" / "11" / "images" / "11001.jpg"
    # str counts (ref 0), a list holding one RLE dict (ref 1), uncompressed counts (ref 2)
    assert [int(s.masks.sum()) for s in unc] == [253, 6 * 34, 25 * 17]


# ----------------------------------------------------------------------------- gRefCOCO


def test_grefcoco_targets_no_target_and_difficulty(tmp_path: Path) -> None:
    make_grefcoco(tmp_path)
    ds = GRefCOCODataset(tmp_path)
    by_ref = {r.ref_id: r for r in ds.refs}
    assert by_ref[1].target_ids == (101,) and by_ref[2].target_ids == (101, 102)
    assert by_ref[3].target_ids == () and by_ref[3].no_target
    assert all(not s.exist for s in by_ref[3].sentences)
    assert [s.exist for s in by_ref[2].sentences] == [True, False]
    multi = next(s for s in ds if s.ref_id == 2 and s.exist)
    assert multi.masks.shape == (2, 32, 48) and not (multi.masks[0] & multi.masks[1]).any()
    assert [s.difficulty for s in ds if s.ref_id == 1] == ["simple", None]
    assert ds.name == "grefcoco" and ds[0].dataset == "grefcoco"


def test_grefcoco_finds_images_in_the_lisa_mscoco_folder(tmp_path: Path) -> None:
    make_grefcoco(tmp_path, images_in_mscoco=True)
    ds = GRefCOCODataset(tmp_path, split="val")
    assert ds.image_root == tmp_path / "images" / "mscoco" / "images" / "train2014"
    assert ds[0].image.shape == (36, 44, 3)


def test_grefcoco_image_root_override(tmp_path: Path) -> None:
    make_grefcoco(tmp_path)
    moved = tmp_path / "elsewhere"
    (tmp_path / "images" / "train2014").rename(moved)
    ds = build_dataset("grefcoco", tmp_path, "train", image_root=moved)
    assert ds.refs[0].image_path.parent == moved and ds[0].image.shape == (32, 48, 3)


def test_grefcoco_name_is_overridable_by_a_subclass(tmp_path: Path) -> None:
    class Renamed(GRefCOCODataset):
        name = "renamed"

    make_grefcoco(tmp_path)
    ds = Renamed(tmp_path, split="train")
    assert ds.name == "renamed" and ds[0].dataset == "renamed"


# ----------------------------------------------------------------------------- RIS-CQ, ReasonSeg, JSONL


def test_riscq_sizes_from_headers_and_ids(tmp_path: Path) -> None:
    make_riscq(tmp_path)
    ds = RISCQDataset(tmp_path, split="train")
    assert [(r.height, r.width) for r in ds.refs] == [(36, 44), (36, 44), (40, 32)]
    assert [r.target_ids for r in ds.refs] == [(3648962,), (1249568,), (255,)]
    assert ds.refs[0].image_id == 17 and ds.refs[0].ref_id == "train:0"


def test_riscq_ignores_other_json_files_beside_the_splits(tmp_path: Path) -> None:
    info = make_riscq(tmp_path)
    (tmp_path / "panoptic_train2017.json").write_text('{"annotations": []}')
    assert len(RISCQDataset(tmp_path)) == info.samples


def test_reasonseg_ignore_and_paint_order(tmp_path: Path) -> None:
    make_reasonseg(tmp_path)
    ds = ReasonSegDataset(tmp_path, split="train")
    a = next(s for s in ds if s.ref_id == "train/a")
    assert a.ignore[14, 14] and not a.masks[0, 14, 14]  # smaller ignore over the larger target
    assert a.masks[0, 2, 2] and a.masks[0, 30, 30] and not a.masks[0, 35, 40]  # flag shape skipped
    b = next(s for s in ds if s.ref_id == "train/b")
    assert b.masks[0, 8, 8] and not b.ignore[8, 8]  # smaller target over the larger ignore
    assert b.ignore[0, 0] and not b.masks[0, 0, 0]
    assert [s.text for s in ds if s.ref_id == "train/a"] == ["what holds the food?", "the plate"]


def test_jsonl_single_file_root(tmp_path: Path) -> None:
    info = make_jsonl(tmp_path)
    ds = JsonlDataset(info.root / "train.jsonl")
    assert len(ds) == info.splits["train"] and {r.split for r in ds.refs} == {"train"}
    line2 = next(s for s in ds if s.ref_id == "train:2")
    assert line2.masks.shape == (2, 36, 36)


def test_jsonl_image_root_override(tmp_path: Path) -> None:
    info = make_jsonl(tmp_path)
    (tmp_path / "pictures").mkdir()
    (info.root / "imgs").rename(tmp_path / "pictures" / "imgs")
    ds = JsonlDataset(info.root, split="train", image_root=tmp_path / "pictures")
    assert ds.refs[0].image_path == tmp_path / "pictures" / "imgs" / "a.jpg"  # relative: under image_root
    assert ds[0].masks.shape == (1, 32, 40)
    with pytest.raises(DatasetError, match="image not found"):
        JsonlDataset(info.root, split="train", image_root=tmp_path / "nowhere")


def test_jsonl_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    info = make_jsonl(tmp_path)
    text = "left\u2028right"  # str.splitlines() would cut the line here
    record = {"image": "imgs/c.jpg", "expression": text, "masks": []}
    (info.root / "val.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    ds = JsonlDataset(info.root, split="val")
    assert len(ds) == 1 and ds[0].text == text


def test_image_size_applies_exif_rotation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 40 wide x 32 high, shown 32 wide x 40 high
    Image.new("RGB", (40, 32), (9, 9, 9)).save(path, exif=exif)
    assert image_size(path) == (40, 32) == read_image(path).shape[:2]


# ----------------------------------------------------------------------------- registry

_REGISTRY_FIXTURES: dict[str, Callable[[Path], FixtureInfo]] = {
    "refcoco": make_refer,
    "refcoco+": lambda root: make_refer(root, "refcoco+"),
    "refcocog": lambda root: make_refer(root, "refcocog", "umd"),
    "refclef": make_refclef,
    "rrefcoco": make_rrefcoco,
    "rrefcoco+": lambda root: make_rrefcoco(root, "rrefcoco+"),
    "rrefcocog": lambda root: make_refer(root, "rrefcocog", "umd", negatives=True),
    "grefcoco": make_grefcoco,
    "riscq": make_riscq,
    "reasonseg": make_reasonseg,
    "jsonl": make_jsonl,
}


def test_registry_covers_every_loader_but_synthref() -> None:
    assert set(DATASET_NAMES) - {"synthref"} == set(_REGISTRY_FIXTURES)


@pytest.mark.parametrize("name", list(_REGISTRY_FIXTURES))
def test_build_dataset_by_name(tmp_path: Path, name: str) -> None:
    info = _REGISTRY_FIXTURES[name](tmp_path)
    ds = build_dataset(name, info.root)  # default splitBy
    assert len(ds) == info.samples and ds.name == name
    sample = ds[len(ds) - 1]
    assert sample.dataset == name and sample.image.dtype == np.uint8


@pytest.mark.parametrize("layout", ["root", "images", "elsewhere"])
def test_riscq_finds_images_where_coco_users_keep_them(layout: str, tmp_path: Path) -> None:
    """``<root>/<file_name>`` (COCO's own layout), ``<root>/images/<file_name>``, or any image_root."""
    info = make_riscq(tmp_path / "riscq")
    image_root = None
    if layout == "root":  # root/train2017/x.jpg
        for folder in list((info.root / "images").iterdir()):
            shutil.move(str(folder), str(info.root / folder.name))
    elif layout == "elsewhere":
        image_root = tmp_path / "coco"
        shutil.move(str(info.root / "images"), str(image_root))
    ds = RISCQDataset(info.root, split="train", image_root=image_root)
    expected = {"root": info.root, "images": info.root / "images", "elsewhere": image_root}[layout]
    assert ds.refs[0].image_path == expected / "train2017" / "000000000017.jpg"
    assert ds[0].masks.shape == (1, 36, 44)


def test_riscq_missing_image_lists_every_path_tried(tmp_path: Path) -> None:
    info = make_riscq(tmp_path)
    (info.root / "images" / "val2017" / "000000000031.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        RISCQDataset(info.root, split="val")
    message = str(err.value)
    assert "val.json entry 0: image not found; tried: " in message
    assert str(info.root / "val2017" / "000000000031.jpg") in message
    assert str(info.root / "images" / "val2017" / "000000000031.jpg") in message
    with pytest.raises(DatasetError, match=r"tried: [^,]*elsewhere[/\\]val2017[/\\]000000000031\.jpg$"):
        RISCQDataset(info.root, split="val", image_root=tmp_path / "elsewhere")
