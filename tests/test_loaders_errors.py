"""Loaders fail loudly on missing / malformed / hostile files, naming the file (and entry)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dataset_fixtures import make_grefcoco, make_jsonl, make_reasonseg, make_refclef, make_refer, make_riscq

from mllm_ris.data import build_dataset
from mllm_ris.data.jsonl import JsonlDataset
from mllm_ris.data.reasonseg import ReasonSegDataset
from mllm_ris.data.refer import ReferDataset
from mllm_ris.data.riscq import RISCQDataset
from mllm_ris.data.safe_pickle import load_refs_pickle, safe_loads
from mllm_ris.errors import DatasetError


class _RunsShell:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


# ----------------------------------------------------------------------------- restricted unpickler


def test_malicious_refs_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    make_refer(tmp_path)
    marker = tmp_path / "pwned"
    payload = [{"ref_id": 1, "evil": _RunsShell(f"touch {marker}")}]
    refs = tmp_path / "refcoco" / "refs(unc).p"
    refs.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DatasetError, match=r"refusing to unpickle (posix|nt)\.system from .*refs\(unc\)\.p"):
        ReferDataset(tmp_path, dataset="refcoco")
    assert not marker.exists()
    # The same bytes through plain pickle would have run the command: the test payload is live.
    pickle.loads(refs.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    ("obj", "refused"),
    [
        (np.arange(3), "numpy"),
        (b"bytes at protocol 2", "_codecs.encode"),
        (Path("x"), "pathlib"),
    ],
    ids=["numpy", "protocol2-bytes", "class"],
)
def test_non_builtin_globals_are_refused(obj: Any, refused: str) -> None:
    with pytest.raises(DatasetError, match=f"refusing to unpickle {refused}.*builtin containers and scalars"):
        safe_loads(pickle.dumps(obj, protocol=2), source="x.p")


def test_builtin_containers_and_scalars_load() -> None:
    data = {"a": [1, 2.5, None, True], "b": (1, "x"), "c": {1, 2}, "d": frozenset({3}), "e": b"raw"}
    for protocol in (2, 4, pickle.HIGHEST_PROTOCOL):
        if protocol == 2:
            data = {k: v for k, v in data.items() if k != "e"}  # bytes need _codecs at protocol 2
        assert safe_loads(pickle.dumps(data, protocol=protocol)) == data


def test_python2_pickle_loads_with_latin1_strings() -> None:
    # What Python 2 writes for [{'sent': 'caf\xe9', 'ids': set([7])}] at protocol 2: a py2 str is a
    # SHORT_BINSTRING of raw bytes and set is a GLOBAL '__builtin__ set'.
    py2 = (
        b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x04caf\xe9q\x03U\x03idsq\x04"
        b"c__builtin__\nset\nq\x05]q\x06K\x07a\x85q\x07Rq\x08ua."
    )
    assert safe_loads(py2) == [{"sent": "café", "ids": {7}}]


def test_truncated_or_missing_pickle(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"a": 1}], protocol=2)[:-3])
    with pytest.raises(DatasetError, match=r"cannot unpickle .*refs\(unc\)\.p"):
        load_refs_pickle(path)
    with pytest.raises(DatasetError, match=r"refs pickle not found: .*nothere\.p"):
        load_refs_pickle(tmp_path / "nothere.p")


# ----------------------------------------------------------------------------- refer / gRefCOCO files


def test_missing_image_names_the_path(tmp_path: Path) -> None:
    make_refer(tmp_path)
    image = tmp_path / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000001.jpg"
    image.unlink()
    ds = ReferDataset(tmp_path, dataset="refcoco", split="train")  # annotations only: still opens
    with pytest.raises(DatasetError, match=f"image not found: {image}"):
        ds[0]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "invalid JSON at line 1"),
        ('{"images": []}', "missing key 'annotations'"),
        ('{"images": [{"id": 1, "file_name": "a.jpg", "height": "32", "width": 48}], "annotations": []}',
         r"images\[0\]: 'height' has type str, expected int"),
        ("[1, 2]", "expected a JSON object"),
    ],
    ids=["syntax", "missing-key", "wrong-type", "not-an-object"],
)  # fmt: skip
def test_corrupt_instances_json_names_the_file(tmp_path: Path, content: str, problem: str) -> None:
    make_refer(tmp_path)
    instances = tmp_path / "refcoco" / "instances.json"
    instances.write_text(content)
    with pytest.raises(DatasetError, match=f"{instances}.*{problem}"):
        ReferDataset(tmp_path, dataset="refcoco")


def test_missing_annotation_files(tmp_path: Path) -> None:
    make_refer(tmp_path)
    with pytest.raises(DatasetError, match=r"refs pickle not found: .*refcoco[/\\]refs\(google\)\.p"):
        ReferDataset(tmp_path, dataset="refcoco", split_by="google")
    (tmp_path / "refcoco" / "instances.json").unlink()
    with pytest.raises(DatasetError, match=r"instances file not found: .*instances\.json"):
        ReferDataset(tmp_path, dataset="refcoco")
    with pytest.raises(DatasetError, match=r"gRefCOCO refs file not found: .*grefs\(unc\)\.json"):
        build_dataset("grefcoco", tmp_path)


def _rewrite_refs(path: Path, edit: Any) -> None:
    refs = pickle.loads(path.read_bytes())
    edit(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))


def test_ref_with_unknown_ann_id_names_it_and_the_file(tmp_path: Path) -> None:
    make_refer(tmp_path)
    _rewrite_refs(tmp_path / "refcoco" / "refs(unc).p", lambda refs: refs[1].update(ann_id=999))
    with pytest.raises(
        DatasetError, match=r"ref_id 2: ann id 999 not found in .*refcoco[/\\]instances\.json"
    ):
        ReferDataset(tmp_path, dataset="refcoco")


def test_ref_missing_a_key_or_sentence_text(tmp_path: Path) -> None:
    make_refer(tmp_path)
    refs = tmp_path / "refcoco" / "refs(unc).p"

    def drop_text(r: list[dict[str, Any]]) -> None:
        del r[0]["sentences"][0]["sent"], r[0]["sentences"][0]["raw"]

    _rewrite_refs(refs, drop_text)
    with pytest.raises(DatasetError, match=r"ref_id 1 sentence 0: needs a string 'sent' or 'raw'"):
        ReferDataset(tmp_path, dataset="refcoco")
    _rewrite_refs(refs, lambda r: r[0].pop("image_id"))
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p ref_id 1: missing key 'image_id'"):
        ReferDataset(tmp_path, dataset="refcoco")


def test_undecodable_rle_names_the_annotation(tmp_path: Path) -> None:
    make_refclef(tmp_path)
    instances = tmp_path / "refclef" / "instances.json"
    data = json.loads(instances.read_text())
    data["annotations"][0]["segmentation"] = {"size": [5, 5], "counts": "abc"}
    instances.write_text(json.dumps(data))
    ds = ReferDataset(tmp_path, dataset="refclef", split="train")
    with pytest.raises(DatasetError, match=r"instances\.json: cannot decode annotation 201: RLE size"):
        ds[0]


def test_grefcoco_ref_with_bad_ann_id(tmp_path: Path) -> None:
    make_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    refs[1]["ann_id"] = [101, "x", None]
    path.write_text(json.dumps(refs))
    with pytest.raises(DatasetError, match=r"grefs\(unc\)\.json ref_id 2: 'ann_id' must be an id or a list"):
        build_dataset("grefcoco", tmp_path)


# ----------------------------------------------------------------------------- RIS-CQ / ReasonSeg


def test_riscq_segment_absent_from_png(tmp_path: Path) -> None:
    make_riscq(tmp_path)
    path = tmp_path / "val.json"
    entries = json.loads(path.read_text())
    entries[0]["id"] = 4242
    path.write_text(json.dumps(entries))
    ds = RISCQDataset(tmp_path, split="val")
    with pytest.raises(
        DatasetError, match=r"panoptic_val2017[/\\]000000000031\.png has no segment with id 4242"
    ):
        ds[0]


def test_riscq_bad_entry_and_missing_image(tmp_path: Path) -> None:
    make_riscq(tmp_path)
    path = tmp_path / "val.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps([{**good[0], "id": "17"}]))
    with pytest.raises(DatasetError, match=r"val\.json entry 0: 'id' has type str, expected int"):
        RISCQDataset(tmp_path, split="val")
    path.write_text(json.dumps(good))
    image = tmp_path / "images" / "val2017" / "000000000031.jpg"
    image.unlink()
    with pytest.raises(DatasetError, match=f"image not found; tried: .*{re.escape(str(image))}"):
        RISCQDataset(tmp_path)


def test_reasonseg_malformed_shape(tmp_path: Path) -> None:
    make_reasonseg(tmp_path)
    path = tmp_path / "val" / "c.json"
    ann = json.loads(path.read_text())
    ann["shapes"][0]["points"] = [[1, 2, 3]]
    path.write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match=r"c\.json shapes\[0\]: point \[1, 2, 3\] is not \[x, y\]"):
        ReasonSegDataset(tmp_path, split="val")


# ----------------------------------------------------------------------------- JSONL


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"image": "imgs/a.jpg", "expression": "x", "masks": [', "invalid JSON"),
        ('["not", "an", "object"]', "a line must be a JSON object"),
        ('{"expression": "x", "masks": []}', "missing key 'image'"),
        ('{"image": "imgs/a.jpg", "expression": "x"}', "missing key 'masks'"),
        ('{"image": "imgs/a.jpg", "expression": 3, "masks": []}', "'expression' has type int, expected str"),
        ('{"image": "imgs/a.jpg", "expression": "x", "expressions": ["y"], "masks": []}', "exactly one of"),
        ('{"image": "imgs/a.jpg", "expressions": [], "masks": []}', "non-empty list of strings"),
        ('{"image": "imgs/a.jpg", "expression": "x", "masks": {}}', "'masks' has type dict, expected list"),
        ('{"image": "imgs/a.jpg", "expression": "x", "masks": [[1, 2]]}', r"masks\[0\] must be a COCO RLE"),
        ('{"image": "imgs/a.jpg", "expression": "x", "masks": [{"size": [9, 9], "counts": "a"}]}',
         r"RLE size \[9, 9\] does not match the image \(32, 40\)"),
        ('{"image": "imgs/a.jpg", "expression": "x", "masks": [], "id": "a"}', "duplicate id 'a'"),
        ('{"image": "imgs/a.jpg", "expression": "x", "masks": [], "split": "val"}', "'split' is 'val'"),
        ('{"image": "imgs/nope.jpg", "expression": "x", "masks": []}', "image not found"),
    ],
    ids=["json", "not-object", "no-image", "no-masks", "type", "both", "empty", "masks-type", "mask-entry",
         "rle-size", "duplicate-id", "split-mismatch", "missing-image"],
)  # fmt: skip
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    info = make_jsonl(tmp_path)
    path = info.root / "train.jsonl"
    with path.open("a") as f:
        f.write("\n" + line + "\n")  # a blank line 3 (skipped), the bad line is line 4
    with pytest.raises(DatasetError, match=f"{path}:4: .*{problem}"):
        JsonlDataset(info.root)


def test_jsonl_missing_mask_png_and_root(tmp_path: Path) -> None:
    info = make_jsonl(tmp_path)
    (info.root / "masks" / "b0.png").unlink()
    ds = JsonlDataset(info.root, split="train")
    with pytest.raises(DatasetError, match=r"mask PNG not found: .*b0\.png"):
        ds[1]
    with pytest.raises(DatasetError, match="JSONL dataset not found"):
        JsonlDataset(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match=r"split file .*test\.jsonl not found; splits present: train, val"):
        JsonlDataset(info.root, split="test")
