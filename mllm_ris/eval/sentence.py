"""Does the model follow the sentence? Pairs of queries on one image that name different objects.

A referring model that ignores the sentence (the same "salient shape" for every query of a scene)
can still reach a respectable cIoU; this check cannot be passed that way. For each pair ``(a, b)``
of single-target samples on the same image whose targets differ (target IoU < 0.5):

* ``follows``: each prediction overlaps its own target more than the other query's target
  (``IoU(pred_a, tgt_a) > IoU(pred_a, tgt_b)`` and the same for ``b``);
* ``same_mask``: the two predictions are (almost) the same mask (IoU ≥ 0.9, or both empty).

A text-blind model scores ``follows`` ≈ 0 and ``same_mask`` ≈ 1; the oracle 1 and 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mllm_ris.data.sample import ReferringDataset, RISSample
from mllm_ris.eval.evaluate import Predictor

__all__ = ["SentenceReport", "follows_pair", "follows_sentence", "mask_iou", "sentence_pairs"]


@dataclass
class SentenceReport:
    """Counts over the evaluated pairs (rates in [0, 1]; None without pairs)."""

    pairs: int
    follows: int
    same_mask: int

    @property
    def follows_rate(self) -> float | None:
        return self.follows / self.pairs if self.pairs else None

    @property
    def same_mask_rate(self) -> float | None:
        return self.same_mask / self.pairs if self.pairs else None

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "pairs": self.pairs,
            "follows": self.follows_rate,
            "same_mask": self.same_mask_rate,
        }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two ``(H, W)`` bool masks; two empty masks score 1."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def follows_pair(pred_a: np.ndarray, pred_b: np.ndarray, target_a: np.ndarray, target_b: np.ndarray) -> bool:
    """Each prediction ``(H, W)`` bool overlaps its own target more than the other query's (IoU)."""
    return mask_iou(pred_a, target_a) > mask_iou(pred_a, target_b) and mask_iou(pred_b, target_b) > mask_iou(
        pred_b, target_a
    )


def sentence_pairs(dataset: ReferringDataset, *, limit: int | None = None) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` of single-target samples of one image whose targets differ (IoU < 0.5),
    at most one pair per image, first ``limit`` pairs in dataset order.

    Reads every sample's masks once (``dataset[i]``) until ``limit`` pairs are found.
    """
    by_image: dict[object, list[tuple[int, np.ndarray]]] = defaultdict(list)
    pairs: list[tuple[int, int]] = []
    done: set[object] = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample.masks.shape[0] != 1 or sample.image_id in done:
            continue
        mask = sample.masks[0]
        for j, other in by_image[sample.image_id]:
            if mask_iou(mask, other) < 0.5:
                pairs.append((j, i))
                done.add(sample.image_id)
                break
        else:
            by_image[sample.image_id].append((i, mask))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def _predict(predictor: Predictor, samples: list[RISSample]) -> list[np.ndarray]:
    batch = getattr(predictor, "predict_batch", None)
    masks = batch(samples) if batch is not None else [predictor(s) for s in samples]
    pairs = zip(masks, samples, strict=True)
    return [m.any(axis=0) if m.shape[0] else np.zeros(s.masks.shape[1:], bool) for m, s in pairs]


def follows_sentence(
    predictor: Predictor,
    dataset: ReferringDataset,
    pairs: list[tuple[int, int]],
    *,
    progress: bool = False,
) -> SentenceReport:
    """Run ``predictor`` on both samples of every pair (the union of its masks is the prediction)."""
    follows = same = 0
    for i, j in tqdm(pairs, desc="pairs", disable=not progress):
        a, b = dataset[i], dataset[j]
        pa, pb = _predict(predictor, [a, b])
        ta, tb = a.masks[0], b.masks[0]
        follows += int(follows_pair(pa, pb, ta, tb))
        same += int(mask_iou(pa, pb) >= 0.9)
    return SentenceReport(pairs=len(pairs), follows=follows, same_mask=same)
