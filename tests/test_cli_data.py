"""`mllm-ris data check` and `mllm-ris eval --predictor` end to end on every exact layout."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

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

from mllm_ris.cli import main
from mllm_ris.data.check import COUNT_KEYS
from mllm_ris.eval.metrics import METRIC_KEYS

MAKERS: dict[str, Callable[[Path], FixtureInfo]] = {
    "refcoco": lambda r: make_refer(r, "refcoco", "unc"),
    "refcoco+": lambda r: make_refer(r, "refcoco+", "unc"),
    "refcocog": lambda r: make_refer(r, "refcocog", "umd"),
    "refclef": lambda r: make_refclef(r, "berkeley"),
    "rrefcoco": make_rrefcoco,
    "rrefcoco+": lambda r: make_rrefcoco(r, "rrefcoco+"),
    "rrefcocog": lambda r: make_refer(r, "rrefcocog", "umd", negatives=True),
    "grefcoco": make_grefcoco,
    "riscq": make_riscq,
    "reasonseg": make_reasonseg,
    "jsonl": make_jsonl,
}


def _dataset_args(info: FixtureInfo) -> list[str]:
    args = ["--dataset", info.name, "--root", str(info.root)]
    if info.split_by is not None:
        args += ["--split-by", info.split_by]
    return args


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_data_check_json_counts(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = MAKERS[name](tmp_path)
    assert main(["data", "check", *_dataset_args(info), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one JSON object on stdout
    assert out.count("\n") == 1
    assert {"images", "refs", "sentences", "negatives", "no_target", "instances", "problems"} <= set(report)
    assert report["problems"] == []
    for key in COUNT_KEYS:
        assert report[key] == getattr(info, key), key


def test_data_check_table_and_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = make_refer(tmp_path)
    images = sorted((tmp_path / "images" / "mscoco" / "images" / "train2014").iterdir())
    images[0].unlink()  # one missing image is a problem, not a crash
    images[1].write_bytes(b"not an image")  # one corrupt image too
    code = main(["data", "check", *_dataset_args(info)])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 problem(s)" in out
    assert f"image not found: {images[0]}" in out
    assert f"cannot read image {images[1]}" in out


def test_data_check_json_reports_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = make_grefcoco(tmp_path)
    next((tmp_path / "images" / "train2014").iterdir()).unlink()
    assert main(["data", "check", *_dataset_args(info), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["problems"]) == 1
    assert report["problems"][0].startswith("image not found: ")
    assert report["refs"] == info.refs  # counting goes on past the problem


def test_data_check_split_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = make_refer(tmp_path)
    assert main(["data", "check", *_dataset_args(info), "--split", "train", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sentences"] + report["negatives"] == info.splits["train"]


def test_data_check_unreadable_dataset_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "check", "--dataset", "refcoco", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mllm-ris: error: ") and str(tmp_path) in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_eval_predictors_on_every_layout(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = MAKERS[name](tmp_path / "data")
    results = {}
    for predictor in ("empty", "gt-box"):
        out_dir = tmp_path / f"out-{predictor}"
        args = ["eval", *_dataset_args(info), "--split", "all", "--predictor", predictor]
        assert main([*args, "--out", str(out_dir), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert set(METRIC_KEYS) <= set(report)
        assert report["samples"] == info.sentences + info.negatives
        assert sum(m["samples"] for m in report["splits"].values()) == report["samples"]
        assert (out_dir / "metrics.json").is_file() and (out_dir / "metrics.md").is_file()
        assert json.loads((out_dir / "metrics.json").read_text())["cIoU"] == report["cIoU"]
        results[predictor] = report
    empty, box = results["empty"], results["gt-box"]
    assert empty["cIoU"] == 0.0
    assert empty["t_acc"] == (0.0 if info.sentences else None)
    assert empty["n_acc"] == (1.0 if info.negatives else None)
    assert 0.0 < box["cIoU"] <= 1.0  # boxes cover the targets, plus background pixels
    assert box["prec@0.5"] is not None
    if name.startswith("rrefcoco"):
        assert box["r"] == 1.0 and empty["r"] == 1.0  # no predicted pixels on negatives
        assert box["rIoU"] is not None


def test_eval_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = make_refer(tmp_path / "data")
    code = main(
        ["eval", *_dataset_args(info), "--split", "train", "--predictor", "gt-box", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "cIoU" in out and "metrics.json" in out


def test_eval_unknown_split_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = make_refer(tmp_path / "data")
    assert main(["eval", *_dataset_args(info), "--split", "nope", "--predictor", "empty"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1


def test_make_synthref_then_check_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synthref"
    assert (
        main(["make-synthref", str(out), "--images", "12", "--seed", "3", "--size", "64", "--workers", "1"])
        == 0
    )
    capsys.readouterr()
    counts = json.loads((out / "synthref_meta.json").read_text())["counts"]
    assert main(["data", "check", "--dataset", "synthref", "--root", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == []
    assert report["images"] == counts["images"] == 12
    assert report["refs"] == sum(counts["refs"].values())
    assert report["no_target"] == counts["refs"]["no_target"]
    assert report["negatives"] == counts["sentences"]["negative"]
    assert report["sentences"] == sum(counts["sentences"].values()) - counts["sentences"]["negative"]

    args = ["eval", "--dataset", "synthref", "--root", str(out), "--split", "all", "--predictor", "gt-box"]
    assert main([*args, "--out", str(tmp_path / "ev"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev["splits"]) == {"train", "val", "test"}
    assert set(ev["difficulty"]) == {"simple", "spatial", "relational", "multi", "negative"}
    assert ev["difficulty"]["negative"]["n_acc"] == 1.0  # gt-box predicts nothing without a target
    assert ev["difficulty"]["negative"]["cIoU"] is None
    assert 0.3 < ev["difficulty"]["simple"]["cIoU"] < 1.0  # boxes around non-rectangular shapes
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "## Per difficulty" in md and "| relational |" in md


def test_make_synthref_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-synthref", str(tmp_path / "x"), "--images", "0"]) == 2
    assert "--images: must be >= 1" in capsys.readouterr().err
    assert main(["make-synthref", str(tmp_path / "y"), "--images", "2", "--negative-forms", "attr,size"]) == 2
    err = capsys.readouterr().err
    assert "negative_forms: ['attr', 'size']; choose from" in err and len(err.strip().splitlines()) == 1


def test_make_synthref_negative_forms_all(tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["make-synthref", str(out), "--images", "3", "--size", "64", "--workers", "1"]
    assert main([*args, "--negative-forms", "all"]) == 0
    assert json.loads((out / "synthref_meta.json").read_text())["negative_forms"] == [
        "attr",
        "spatial",
        "relational",
    ]


def test_image_root_flag_for_data_check_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--image-root`` points ``data check`` and ``eval`` at images kept anywhere."""
    info = make_riscq(tmp_path / "riscq")
    shutil.move(str(info.root / "images"), str(tmp_path / "coco"))
    args = [*_dataset_args(info), "--image-root", str(tmp_path / "coco")]
    assert main(["data", "check", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["refs"] == info.refs
    out = tmp_path / "eval"
    code = main(["eval", *args, "--split", "val", "--predictor", "gt-box", "--out", str(out), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)
    assert main(["data", "check", *_dataset_args(info)]) == 2  # without it: one line naming the paths tried
    assert "image not found; tried: " in capsys.readouterr().err
