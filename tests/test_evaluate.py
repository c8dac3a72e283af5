"""Tests of the evaluation loop, the baseline predictors and the report on an in-memory dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mllm_ris.data.sample import RefEntry, ReferringDataset, RISSample, Sentence
from mllm_ris.errors import ConfigError, MllmRisError
from mllm_ris.eval.evaluate import (
    CONVENTIONS_LINE,
    EmptyPredictor,
    EvalReport,
    GTBoxPredictor,
    PredictionError,
    build_predictor,
    evaluate,
)
from mllm_ris.eval.metrics import METRIC_KEYS
from mllm_ris.processing.masks import mask_to_box

H, W = 16, 20


def rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


class TinyDataset(ReferringDataset):
    """Refs whose ``payload`` holds ``(masks (T, H, W), ignore (H, W) | None)``; no files."""

    def load_image(self, ref: RefEntry) -> np.ndarray:
        return np.zeros((ref.height, ref.width, 3), dtype=np.uint8)

    def load_masks(self, ref: RefEntry) -> np.ndarray:
        return ref.payload[0]

    def load_ignore(self, ref: RefEntry) -> np.ndarray | None:
        return ref.payload[1]


def make_ref(
    ref_id: int,
    split: str,
    masks: list[np.ndarray],
    sentences: list[Sentence],
    ignore: np.ndarray | None = None,
) -> RefEntry:
    arr = np.stack(masks) if masks else np.zeros((0, H, W), bool)
    return RefEntry(
        ref_id=ref_id,
        image_id=100 + ref_id,
        image_path=Path(f"/nonexistent/{ref_id}.jpg"),
        height=H,
        width=W,
        split=split,
        sentences=tuple(sentences),
        target_ids=tuple(range(len(masks))),
        payload=(arr, ignore),
    )


def synth_dataset() -> TinyDataset:
    """6 samples: val 3 (ref 1 x2, ref 2), testA 3 (ref 3 no-target, ref 4 positive + negative)."""
    refs = [
        make_ref(
            1,
            "val",
            [rect(2, 6, 3, 9)],
            [
                Sentence("the red box", 10, difficulty="simple"),
                Sentence("box on the left", 11, difficulty="spatial"),
            ],
        ),
        make_ref(
            2,
            "val",
            [rect(0, 3, 0, 4), rect(10, 14, 12, 20)],
            [Sentence("both boxes", 20, difficulty="multi")],
        ),
        make_ref(3, "testA", [], [Sentence("the purple cat", 30, exist=False, difficulty="negative")]),
        make_ref(
            4,
            "testA",
            [rect(8, 12, 1, 5)],
            [
                Sentence("box left of the other", 40, difficulty="relational"),
                Sentence("the green box", 41, exist=False, difficulty="negative"),
            ],
        ),
    ]
    return TinyDataset(refs, name="synthref", split=None)


def real_dataset() -> TinyDataset:
    """A RefCOCO-like dataset: no difficulty, no negatives."""
    refs = [make_ref(7, "val", [rect(1, 5, 1, 5)], [Sentence("a", 70), Sentence("b", 71)])]
    return TinyDataset(refs, name="refcoco", split="val")


def test_gt_box_scores_one_on_rectangles() -> None:
    report = evaluate(synth_dataset(), build_predictor("gt-box"), progress=False)
    m = report.metrics
    assert report.samples == m["samples"] == 6
    assert report.predictor == "gt-box" and report.dataset == "synthref"
    for key in METRIC_KEYS:  # every metric is perfect: boxes are exact, negatives predicted empty
        assert m[key] == pytest.approx(1.0), key


def test_empty_predictor() -> None:
    report = evaluate(synth_dataset(), EmptyPredictor(), progress=False)
    m = report.metrics
    assert m["cIoU"] == 0.0 and m["mIoU"] == 0.0
    assert m["n_acc"] == 1.0 and m["t_acc"] == 0.0
    assert m["gIoU"] == pytest.approx(2 / 6)  # 2 of 6 samples are no-target, each scores 1
    assert m["r"] == 1.0 and m["rIoU"] == 0.0


def test_groups_per_split_and_difficulty() -> None:
    report = evaluate(synth_dataset(), EmptyPredictor(), progress=False)
    assert list(report.splits) == ["val", "testA"]
    assert [report.splits[s]["samples"] for s in report.splits] == [3, 3]
    assert list(report.difficulty) == ["simple", "spatial", "relational", "multi", "negative"]
    assert report.difficulty["negative"]["samples"] == 2
    assert report.difficulty["negative"]["n_acc"] == 1.0
    assert report.difficulty["negative"]["t_acc"] is None
    assert report.splits["val"]["n_acc"] is None  # val has no no-target sample


def test_json_keys() -> None:
    data = evaluate(real_dataset(), GTBoxPredictor(), progress=False).to_json()
    assert set(data) == {*METRIC_KEYS, "samples", "dataset", "predictor", "splits", "difficulty"}
    assert data["difficulty"] == {}
    assert data["r"] is None and data["rIoU"] is None and data["n_acc"] is None
    assert data["cIoU"] == 1.0 and data["samples"] == 2
    assert set(data["splits"]) == {"val"} and data["splits"]["val"]["samples"] == 2
    assert json.loads(json.dumps(data)) == data
    assert EvalReport.from_json(data).to_json() == data


def test_markdown_and_console_table() -> None:
    report = evaluate(synth_dataset(), EmptyPredictor(), progress=False)
    md = report.to_markdown()
    for heading in ("## Overall", "## Per split", "## Per difficulty"):
        assert heading in md
    assert "| split | samples | cIoU |" in md and "| val | 3 |" in md
    assert "| relational |" in md and CONVENTIONS_LINE in md
    assert "100.00" in md and "33.33" in md  # n_acc, gIoU in % with 2 decimals
    real_md = evaluate(real_dataset(), GTBoxPredictor(), progress=False).to_markdown()
    assert "## Per difficulty" not in real_md and "–" in real_md  # undefined r shown as –
    table = report.render_table()
    assert table.row_count == 1 + len(METRIC_KEYS)  # samples + one row per metric
    assert len(table.columns) == 1 + 1 + 2 + 5  # metric, overall, 2 splits, 5 difficulty levels
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    text = console.file.getvalue()
    assert "synthref" in text and "difficulty relational" in text and "n_acc" in text


def test_wrong_prediction_shape_raises_clear_error() -> None:
    ds = synth_dataset()

    def bad_shape(sample: RISSample) -> np.ndarray:
        return np.zeros((1, H + 1, W), dtype=bool)

    with pytest.raises(PredictionError, match=r"\(1, 17, 20\).*\(16, 20, 3\)") as info:
        evaluate(ds, bad_shape, progress=False)
    assert isinstance(info.value, MllmRisError) and "bad_shape" in str(info.value)
    with pytest.raises(PredictionError, match=r"expected \(N, 16, 20\)"):
        evaluate(ds, lambda s: np.zeros((H, W), dtype=bool), progress=False)
    with pytest.raises(PredictionError, match="float32"):
        evaluate(ds, lambda s: np.zeros((1, H, W), dtype=np.float32), progress=False)
    with pytest.raises(PredictionError, match="list"):
        evaluate(ds, lambda s: [], progress=False)
    # 0/1 integer masks are accepted
    assert evaluate(ds, lambda s: s.masks.astype(np.uint8), progress=False).metrics["cIoU"] == 1.0


def test_save_writes_both_files(tmp_path: Path) -> None:
    report = evaluate(synth_dataset(), GTBoxPredictor(), progress=False)
    out = tmp_path / "run" / "eval"
    json_path, md_path = report.save(out)
    assert json_path == out / "metrics.json" and md_path == out / "metrics.md"
    assert json.loads(json_path.read_text(encoding="utf-8")) == report.to_json()
    assert md_path.read_text(encoding="utf-8") == report.to_markdown()
    report.save(out)  # overwriting works and leaves no temporary file behind
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]


def test_limit_progress_and_build_errors(capsys: pytest.CaptureFixture[str]) -> None:
    report = evaluate(synth_dataset(), EmptyPredictor(), limit=2, progress=True)
    assert report.samples == 2 and list(report.splits) == ["val"]
    captured = capsys.readouterr()
    assert captured.out == "" and "eval synthref" in captured.err  # the bar goes to stderr
    with pytest.raises(ConfigError, match="limit"):
        evaluate(synth_dataset(), EmptyPredictor(), limit=0, progress=False)
    with pytest.raises(ConfigError, match="choices: empty, gt-box"):
        build_predictor("oracle")


def test_gt_box_predictor_fills_boxes_and_ignore_is_applied() -> None:
    # an L: 16 + 20 - 4 = 32 px; its box (x 2..11, y 2..9) has 8 * 10 = 80 px
    ell = rect(2, 10, 2, 4) | rect(8, 10, 2, 12)
    sample = RISSample(
        image=np.zeros((H, W, 3), np.uint8),
        masks=np.stack([ell, rect(12, 13, 15, 18)]),
        text="L",
        dataset="t",
        split="val",
        image_id=0,
        ref_id=0,
        sent_id=0,
    )
    boxes = GTBoxPredictor()(sample)
    assert boxes.shape == (2, H, W) and boxes.dtype == bool
    for box, inst in zip(boxes, sample.masks, strict=True):
        assert mask_to_box(box) == mask_to_box(inst)
        assert box.sum() == np.prod(np.subtract(mask_to_box(inst)[2:], mask_to_box(inst)[:2]))
    # Without ignore the L scores 32 / 80 = 0.4; ignoring the box pixels outside the L makes it exact.
    box = boxes[0]
    plain = TinyDataset([make_ref(1, "val", [ell], [Sentence("L", 1)])], name="l", split="val")
    ignored = TinyDataset(
        [make_ref(1, "val", [ell], [Sentence("L", 1)], ignore=box & ~ell)], name="l", split="val"
    )
    assert evaluate(plain, GTBoxPredictor(), progress=False).metrics["cIoU"] == pytest.approx(32 / 80)
    assert evaluate(ignored, GTBoxPredictor(), progress=False).metrics["cIoU"] == 1.0


class _BatchedBox(GTBoxPredictor):
    """gt-box through the batched path, counting how it was called."""

    batch_size = 3

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict_batch(self, samples: list[RISSample]) -> list[np.ndarray]:
        self.calls.append(len(samples))
        return [self(s) for s in samples]


def test_batched_predictor_gives_identical_report() -> None:
    ds = synth_dataset()
    plain = evaluate(ds, GTBoxPredictor(), progress=False)
    batched_predictor = _BatchedBox()
    batched = evaluate(ds, batched_predictor, progress=False)
    assert batched.to_json()["cIoU"] == plain.to_json()["cIoU"]
    assert batched.metrics == plain.metrics and batched.difficulty == plain.difficulty
    assert sum(batched_predictor.calls) == len(ds)
    assert max(batched_predictor.calls) == 3 and len(batched_predictor.calls) == -(-len(ds) // 3)


def test_batched_predictor_must_return_one_prediction_per_sample() -> None:
    class Short(_BatchedBox):
        def predict_batch(self, samples: list[RISSample]) -> list[np.ndarray]:
            return super().predict_batch(samples)[:-1]

    with pytest.raises(PredictionError, match="returned 2 predictions for 3 samples"):
        evaluate(synth_dataset(), Short(), progress=False)
