"""Tests of the RIS metric accumulator against hand-computed values and pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mllm_ris.eval.metrics import METRIC_KEYS, PREC_THRESHOLDS, RISMetrics, mask_counts, sample_iou

PREC_KEYS = [f"prec@{x}" for x in PREC_THRESHOLDS]


def line(width: int, *pixels: int) -> np.ndarray:
    """A ``(1, width)`` mask with the given pixels set (1-D problems are easiest to check by hand)."""
    m = np.zeros((1, width), dtype=bool)
    m[0, list(pixels)] = True
    return m


def test_keys_and_order() -> None:
    out = RISMetrics().compute()
    assert list(out) == [*METRIC_KEYS, "samples"]
    assert METRIC_KEYS[3:8] == tuple(PREC_KEYS)


def test_hand_computed_mixed_samples() -> None:
    m = RISMetrics()
    # S1 target: target = px 0..7 (8 px), pred = px 4..9 (6 px): I = 4, U = 8 + 6 - 4 = 10, IoU 0.4.
    assert m.update(line(16, 4, 5, 6, 7, 8, 9), line(16, *range(8))) == pytest.approx(0.4)
    # S2 target: pred == target = px 0..3: I = 4, U = 4, IoU 1.
    assert m.update(line(16, 0, 1, 2, 3), line(16, 0, 1, 2, 3)) == 1.0
    # S3 no target, predicted empty: TP; I = U = 0; gIoU score 1; IoU undefined -> None.
    assert m.update(line(16), line(16)) is None
    # S4 no target, 3 px predicted: FN; U += 3; gIoU score 0; IoU 0.
    assert m.update(line(16, 0, 1, 2), line(16)) == 0.0
    # S5 target = 2 px, predicted empty: FP; I = 0, U = 2, IoU 0.
    assert m.update(line(16), line(16, 5, 6)) == 0.0
    out = m.compute()
    assert out["samples"] == 5
    # cIoU = ΣI / ΣU = (4 + 4 + 0 + 0 + 0) / (10 + 4 + 0 + 3 + 2) = 8 / 19
    assert out["cIoU"] == pytest.approx(8 / 19)
    # mIoU over target samples S1, S2, S5 = (0.4 + 1 + 0) / 3
    assert out["mIoU"] == pytest.approx(1.4 / 3)
    # gIoU over all five = (0.4 + 1 + 1 + 0 + 0) / 5 = 0.48
    assert out["gIoU"] == pytest.approx(0.48)
    # prec@X over target samples: only S2 (IoU 1) passes any threshold -> 1/3
    for key in PREC_KEYS:
        assert out[key] == pytest.approx(1 / 3)
    # no-target positive class: TP = S3, FN = S4 -> n_acc = 1 / 2
    assert out["n_acc"] == pytest.approx(0.5)
    # TN = S1, S2 (non-empty), FP = S5 (empty) -> t_acc = 2 / 3 (no +1 anywhere)
    assert out["t_acc"] == pytest.approx(2 / 3)
    # no ref ids given -> no R-RIS metrics
    assert out["r"] is None and out["rIoU"] is None


def test_prec_thresholds_are_inclusive_and_exact() -> None:
    m = RISMetrics()
    # I = 7, U = 10 -> IoU exactly 0.7 counts for prec@0.7 (IoU ≥ X), not for 0.8 / 0.9.
    m.update(line(10, *range(7)), line(10, *range(10)))
    # I = 3, U = 5 -> IoU exactly 0.6.
    m.update(line(5, 0, 1, 2), line(5, *range(5)))
    out = m.compute()
    # prec@0.5: 2/2, prec@0.6: 2/2, prec@0.7: 1/2, prec@0.8: 0, prec@0.9: 0
    assert [out[k] for k in PREC_KEYS] == [1.0, 1.0, 0.5, 0.0, 0.0]


def test_ignore_pixels_are_excluded() -> None:
    # target = px 0..3, pred = px 2..7, ignore = px 0, 6, 7 (width 10)
    target, pred, ignore = line(10, 0, 1, 2, 3), line(10, *range(2, 8)), line(10, 0, 6, 7)
    # without ignore: I = |{2,3}| = 2, U = |{0..7}| = 8
    assert mask_counts(pred, target) == (2, 8, 6)
    # with ignore: valid target {1,2,3}, valid pred {2,3,4,5}: I = 2, U = |{1..5}| = 5, |pred| = 4
    assert mask_counts(pred, target, ignore=ignore) == (2, 5, 4)
    assert sample_iou(pred, target, ignore=ignore) == pytest.approx(0.4)
    m = RISMetrics()
    m.update(pred, target, ignore=ignore)
    # a no-target sample predicting only ignored pixels counts as predicted empty (TP, U += 0)
    m.update(line(10, 6, 7), line(10), ignore=ignore)
    out = m.compute()
    assert out["cIoU"] == pytest.approx(2 / 5)
    assert out["n_acc"] == 1.0
    # gIoU = (0.4 + 1) / 2
    assert out["gIoU"] == pytest.approx(0.7)


def test_target_wholly_ignored_has_no_iou() -> None:
    m = RISMetrics()
    # target px 0, all ignored; nothing valid predicted -> U = 0 -> IoU undefined
    assert m.update(line(4), line(4, 0), ignore=line(4, 0)) is None
    out = m.compute()
    assert out["samples"] == 1
    assert out["mIoU"] is None and out["gIoU"] is None and out["cIoU"] is None
    assert out["t_acc"] == 0.0  # a target sample predicted empty is a FP


def test_rris_two_refs() -> None:
    m = RISMetrics()
    w = 8
    # ref A positives: a1 I = 3, U = 4 (target 0..3, pred 0..2); a2 I = 1, U = 4 (target 0..3, pred 3)
    m.update(line(w, 0, 1, 2), line(w, 0, 1, 2, 3), ref_id="A")
    m.update(line(w, 3), line(w, 0, 1, 2, 3), ref_id="A")
    # ref A negatives: n1 predicted empty, n2 predicts 2 px
    m.update(line(w), line(w), ref_id="A")
    m.update(line(w, 6, 7), line(w), ref_id="A")
    # ref B: positive b1 I = 2, U = 2; negative n3 predicted empty
    m.update(line(w, 4, 5), line(w, 4, 5), ref_id="B")
    m.update(line(w), line(w), ref_id="B", negative=True)
    out = m.compute()
    # r_A = 1/2 (n1 of n1, n2), r_B = 1/1 -> r = (0.5 + 1) / 2 = 0.75
    assert out["r"] == pytest.approx(0.75)
    # rIoU_A = (3 + 1) / (4 + 4 + 2) = 0.4, rIoU_B = 2 / (2 + 0) = 1 -> rIoU = 0.7
    assert out["rIoU"] == pytest.approx(0.7)
    # ref C: positives only (I = 1, U = 2) -> counts for rIoU, not for r
    m.update(line(w, 0), line(w, 0, 1), ref_id="C")
    # ref D: one negative only, predicted non-empty -> counts for r (0), not for rIoU
    m.update(line(w, 1), line(w), ref_id="D")
    out = m.compute()
    # r = (0.5 + 1 + 0) / 3
    assert out["r"] == pytest.approx(1.5 / 3)
    # rIoU = (0.4 + 1 + 0.5) / 3
    assert out["rIoU"] == pytest.approx(1.9 / 3)


def test_rris_undefined_without_negatives() -> None:
    m = RISMetrics()
    m.update(line(4, 0), line(4, 0), ref_id=1)
    m.update(line(4, 1), line(4, 0, 1), ref_id=2)
    out = m.compute()
    assert out["r"] is None and out["rIoU"] is None  # no negative sentence seen
    assert out["n_acc"] is None  # no no-target sample


def test_undefined_values_are_none() -> None:
    empty = RISMetrics().compute()
    assert empty["samples"] == 0
    assert all(empty[k] is None for k in METRIC_KEYS)
    m = RISMetrics()  # only no-target samples, all predicted empty
    m.update(line(4), line(4), ref_id=1)
    out = m.compute()
    assert out["cIoU"] is None  # ΣU = 0
    assert out["mIoU"] is None and out["t_acc"] is None
    assert all(out[k] is None for k in PREC_KEYS)
    assert out["gIoU"] == 1.0 and out["n_acc"] == 1.0 and out["r"] == 1.0
    assert out["rIoU"] is None  # no ref with a positive sentence


def test_update_errors() -> None:
    m = RISMetrics()
    with pytest.raises(ValueError, match=r"\(1, 4\).*\(1, 5\)"):
        m.update(line(4), line(5))
    with pytest.raises(ValueError, match="negative=True"):
        m.update(line(4), line(4, 0), negative=True)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        m.update(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="inconsistent"):
        m.update_counts(intersection=5, union=3, pred_pixels=4, has_target=True)
    with pytest.raises(ValueError, match="no-target"):
        m.update_counts(intersection=1, union=3, pred_pixels=3, has_target=False)
    assert m.samples == 0


def test_negative_false_with_empty_target() -> None:
    m = RISMetrics()
    # a target sample whose target is empty: IoU 0 when something is predicted, FP/TN as usual
    assert m.update(line(4, 0), line(4), negative=False) == 0.0
    out = m.compute()
    assert out["t_acc"] == 1.0 and out["n_acc"] is None and out["mIoU"] == 0.0


def _random_masks(rng: np.random.Generator, n: int, hw: tuple[int, int]) -> list[tuple[np.ndarray, ...]]:
    out = []
    for _ in range(n):
        target = rng.random(hw) < rng.uniform(0.05, 0.6)
        target[rng.integers(hw[0]), rng.integers(hw[1])] = True  # never empty
        pred = rng.random(hw) < rng.uniform(0.0, 0.6)
        out.append((pred, target))
    return out


def test_agrees_with_pycocotools() -> None:
    rng = np.random.default_rng(0)
    pairs = _random_masks(rng, 60, (23, 31))
    m = RISMetrics()
    sum_i = sum_u = 0
    for pred, target in pairs:
        rp = mask_utils.encode(np.asfortranarray(pred.astype(np.uint8)))
        rt = mask_utils.encode(np.asfortranarray(target.astype(np.uint8)))
        ref_iou = float(mask_utils.iou([rp], [rt], [0])[0, 0])
        assert m.update(pred, target) == pytest.approx(ref_iou, abs=1e-12)
        sum_i += int(mask_utils.area(mask_utils.merge([rp, rt], intersect=True)))
        sum_u += int(mask_utils.area(mask_utils.merge([rp, rt], intersect=False)))
    assert m.compute()["cIoU"] == pytest.approx(sum_i / sum_u, abs=1e-12)


def _random_stream(seed: int, n: int) -> list[dict]:
    """Random samples mixing targets, negatives, ignore maps and refs."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        negative = bool(rng.random() < 0.3)
        target = np.zeros((12, 12), bool) if negative else rng.random((12, 12)) < 0.3
        pred = rng.random((12, 12)) < rng.choice([0.0, 0.2, 0.4])
        ignore = rng.random((12, 12)) < 0.1 if i % 4 == 0 else None
        items.append({"pred": pred, "target": target, "ignore": ignore, "ref_id": int(rng.integers(6))})
    return items


def test_merge_equals_single_accumulator() -> None:
    items = _random_stream(1, 90)
    single = RISMetrics()
    parts = [RISMetrics(), RISMetrics(), RISMetrics()]
    for i, it in enumerate(items):
        single.update(it["pred"], it["target"], ignore=it["ignore"], ref_id=it["ref_id"])
        parts[i % 3].update(it["pred"], it["target"], ignore=it["ignore"], ref_id=it["ref_id"])
    merged = RISMetrics().merge(parts[0]).merge(parts[1]).merge(parts[2])
    a, b = single.compute(), merged.compute()
    assert a["samples"] == b["samples"] == 90
    for key in METRIC_KEYS:
        assert a[key] is not None
        assert b[key] == pytest.approx(a[key], abs=1e-12), key
    with pytest.raises(TypeError):
        single.merge({})  # type: ignore[arg-type]


def test_update_batch_matches_update_numpy_and_torch() -> None:
    items = _random_stream(2, 16)
    preds = np.stack([it["pred"] for it in items])
    targets = np.stack([it["target"] for it in items])
    ignores = np.stack(
        [it["ignore"] if it["ignore"] is not None else np.zeros((12, 12), bool) for it in items]
    )
    ref_ids = [it["ref_id"] for it in items]
    single = RISMetrics()
    expected = [
        single.update(p, t, ignore=g, ref_id=r)
        for p, t, g, r in zip(preds, targets, ignores, ref_ids, strict=True)
    ]
    batched = RISMetrics()
    assert batched.update_batch(preds, targets, ignores=ignores, ref_ids=ref_ids) == pytest.approx(expected)
    assert batched.compute() == pytest.approx(single.compute())
    torch = pytest.importorskip("torch")
    tb = RISMetrics()
    got = tb.update_batch(
        torch.from_numpy(preds), torch.from_numpy(targets), ignores=torch.from_numpy(ignores), ref_ids=ref_ids
    )
    assert got == pytest.approx(expected)
    assert tb.compute() == pytest.approx(single.compute())
    with pytest.raises(ValueError, match="bool"):
        tb.update_batch(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
