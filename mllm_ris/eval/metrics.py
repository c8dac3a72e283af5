"""Referring-segmentation metrics as a streaming accumulator that never stores masks.

:class:`RISMetrics` keeps running integer sums (intersection, union, confusion counts) and a few
small counters per ref, so evaluating a split costs O(#refs) memory whatever the image size.
Every number follows one stated convention (see ``docs/metrics.md``):

* ``cIoU`` (= oIoU): ``Σ I / Σ U`` over all samples. A no-target sample adds 0 to ``Σ I`` and
  its predicted pixels to ``Σ U`` (GRES/ReLA, LISA).
* ``mIoU``: mean per-sample IoU over samples that have a target.
* ``gIoU`` (GRES, LISA): mean per-sample score over all samples; a no-target sample scores 1
  when predicted empty and 0 otherwise.
* ``prec@X`` for X in 0.5 … 0.9: fraction of samples with a target whose IoU ≥ X (compared
  exactly in integers: ``I · den ≥ num · U``).
* ``n_acc`` = TP / (TP + FN) and ``t_acc`` = TN / (TN + FP), with "no target" the positive
  class (GRES); no +1 in the denominators (ReLA's released code adds one).
* ``r`` (R-RefCOCO): mean over refs that have ≥ 1 negative sentence of the fraction of those
  negatives predicted empty.
* ``rIoU`` (R-RefCOCO): mean over refs that have ≥ 1 positive sentence of
  ``I_pos / (U_pos + P_neg)``, where ``I_pos`` / ``U_pos`` sum over the ref's positive
  sentences and ``P_neg`` is the number of pixels predicted on its negative sentences. It is
  None when the accumulator saw no negative sentence at all (it would just be a per-ref IoU).

Pixels in ``ignore`` are removed from the prediction and the target before anything is counted,
so they never enter an intersection, a union, a predicted-pixel count or an emptiness test.
Whether a sample *has a target* is decided by the caller's ``negative`` flag, or else by the
raw target being non-empty. A sample with a target whose union is 0 (its target lies wholly in
``ignore`` and nothing valid is predicted) has no defined IoU: it is left out of mIoU, gIoU and
prec@X but still counts in ``samples``, ``t_acc`` (as predicted empty) and R-RIS.
Values that cannot be computed (no sample of the needed kind) are None.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = [
    "METRIC_KEYS",
    "PREC_THRESHOLDS",
    "MetricsDict",
    "RISMetrics",
    "mask_counts",
    "sample_iou",
]

PREC_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
"""IoU thresholds of the ``prec@X`` metrics."""

METRIC_KEYS: tuple[str, ...] = (
    "cIoU",
    "mIoU",
    "gIoU",
    *(f"prec@{x}" for x in PREC_THRESHOLDS),
    "n_acc",
    "t_acc",
    "r",
    "rIoU",
)
"""The metric keys of :meth:`RISMetrics.compute`, in report order (``samples`` comes after)."""

MetricsDict = dict[str, float | int | None]
"""``METRIC_KEYS`` → value in [0, 1] or None, plus ``"samples"`` → int."""

# Thresholds as exact fractions so that e.g. IoU 7/10 passes prec@0.7 without float doubt.
_PREC_FRACTIONS: tuple[Fraction, ...] = tuple(Fraction(str(x)) for x in PREC_THRESHOLDS)


def _as_bool_2d(name: str, arr: Any) -> np.ndarray:
    """``arr`` as an ``(H, W)`` bool array, or ValueError naming the argument and its shape."""
    out = np.asarray(arr)
    if out.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) mask, got shape {out.shape}")
    return out if out.dtype == bool else out != 0


def mask_counts(
    pred: np.ndarray, target: np.ndarray, *, ignore: np.ndarray | None = None
) -> tuple[int, int, int]:
    """Intersection, union and predicted-pixel count of two masks, ignore pixels excluded.

    Args:
        pred: ``(H, W)`` bool prediction.
        target: ``(H, W)`` bool target (all False for no target).
        ignore: ``(H, W)`` bool pixels to leave out, or None.

    Returns:
        ``(intersection, union, predicted_pixels)`` as Python ints.

    Raises:
        ValueError: the masks are not 2-D or their shapes differ (both shapes are named).
    """
    p = _as_bool_2d("pred", pred)
    t = _as_bool_2d("target", target)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
    if ignore is not None:
        ign = _as_bool_2d("ignore", ignore)
        if ign.shape != p.shape:
            raise ValueError(f"ignore shape {ign.shape} != pred shape {p.shape}")
        valid = ~ign
        p = p & valid
        t = t & valid
    inter = int(np.count_nonzero(p & t))
    n_pred = int(np.count_nonzero(p))
    union = n_pred + int(np.count_nonzero(t)) - inter
    return inter, union, n_pred


def sample_iou(pred: np.ndarray, target: np.ndarray, *, ignore: np.ndarray | None = None) -> float | None:
    """IoU of one ``(H, W)`` prediction against its target, ignore pixels excluded.

    Returns:
        ``I / U``, or None when the union is empty (both masks empty on valid pixels).
    """
    inter, union, _ = mask_counts(pred, target, ignore=ignore)
    return inter / union if union > 0 else None


@dataclass
class _RefStats:
    """Counters of one ref for the R-RIS metrics (a handful of ints, no masks)."""

    n_pos: int = 0  # positive sentences seen
    n_neg: int = 0  # negative sentences seen
    neg_empty: int = 0  # negatives predicted empty
    inter_pos: int = 0  # Σ I over positives
    union_pos: int = 0  # Σ U over positives
    neg_pixels: int = 0  # Σ predicted pixels over negatives

    def add(self, other: _RefStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class RISMetrics:
    """Streaming accumulator of every RIS metric (see the module docstring for conventions).

    Feed it one sample at a time with :meth:`update` (numpy masks), :meth:`update_batch`
    (numpy or torch ``(B, H, W)`` masks, reduced on their own device) or :meth:`update_counts`
    (counts computed elsewhere); read the metrics with :meth:`compute`; combine accumulators
    (per split, per worker) with :meth:`merge`.

    Example:
        >>> m = RISMetrics()
        >>> m.update(pred, target, ref_id=3)
        >>> m.compute()["cIoU"]
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen."""
        self.samples = 0
        self.sum_inter = 0  # Σ I over all samples
        self.sum_union = 0  # Σ U over all samples
        self.n_iou = 0  # target samples with a defined IoU
        self.sum_iou = 0.0  # Σ IoU over those
        self.n_giou = 0  # samples with a defined gIoU score
        self.sum_giou = 0.0  # Σ gIoU score over those
        self.prec_hits = [0] * len(PREC_THRESHOLDS)  # target samples with IoU ≥ X
        self.tp = 0  # no-target, predicted empty
        self.fn = 0  # no-target, predicted non-empty
        self.tn = 0  # target, predicted non-empty
        self.fp = 0  # target, predicted empty
        self.refs: dict[Hashable, _RefStats] = {}

    def update(
        self,
        pred: np.ndarray,
        target: np.ndarray,
        *,
        ignore: np.ndarray | None = None,
        ref_id: Hashable | None = None,
        negative: bool | None = None,
    ) -> float | None:
        """Add one sample.

        Args:
            pred: ``(H, W)`` bool predicted mask (the union of the predicted instances).
            target: ``(H, W)`` bool target (all False for a no-target / negative sample).
            ignore: ``(H, W)`` bool pixels excluded from every count, or None.
            ref_id: the sample's ref; when given, the sample also counts toward ``r`` / ``rIoU``.
            negative: True when the expression refers to nothing. None derives it from the target
                (empty → negative); False with an empty target is a target sample whose target
                is empty on valid pixels (its IoU is 0, or undefined if nothing is predicted).

        Returns:
            The sample's IoU ``I / U``, or None when undefined (``U == 0``). A no-target sample
            returns 0.0 when something is predicted and None when predicted empty.

        Raises:
            ValueError: shapes disagree, or ``negative=True`` with a non-empty target.
        """
        t_raw = _as_bool_2d("target", target)
        has_target = bool(t_raw.any())
        if negative is not None:
            if negative and has_target:
                raise ValueError(f"negative=True but the target has {int(np.count_nonzero(t_raw))} pixels")
            has_target = not negative
        inter, union, n_pred = mask_counts(pred, t_raw, ignore=ignore)
        return self.update_counts(
            intersection=inter, union=union, pred_pixels=n_pred, has_target=has_target, ref_id=ref_id
        )

    def update_batch(
        self,
        preds: Any,
        targets: Any,
        *,
        ignores: Any | None = None,
        ref_ids: Sequence[Hashable | None] | None = None,
        negatives: Sequence[bool] | None = None,
    ) -> list[float | None]:
        """Add ``B`` samples at once; works on numpy arrays and torch tensors (any device).

        Only the per-sample counts leave the device (``.tolist()`` of three ``(B,)`` vectors).

        Args:
            preds: ``(B, H, W)`` bool predictions.
            targets: ``(B, H, W)`` bool targets.
            ignores: ``(B, H, W)`` bool ignore masks, or None.
            ref_ids: ``B`` ref ids (or None entries), or None.
            negatives: ``B`` flags as in :meth:`update`, or None to derive them from the targets.

        Returns:
            The ``B`` sample IoUs as :meth:`update` returns them.
        """
        if tuple(preds.shape) != tuple(targets.shape) or len(preds.shape) != 3:
            raise ValueError(
                f"preds and targets must both be (B, H, W); got {tuple(preds.shape)} and "
                f"{tuple(targets.shape)}"
            )
        for name, arr in (("preds", preds), ("targets", targets), ("ignores", ignores)):
            if arr is not None and str(arr.dtype) not in ("bool", "torch.bool"):
                raise ValueError(f"{name} must be bool, got dtype {arr.dtype}")
        b = int(preds.shape[0])
        p = preds.reshape(b, -1)  # (B, H*W)
        t = targets.reshape(b, -1)  # (B, H*W)
        has_target = t.any(-1).tolist()  # decided on the raw target, before ignore
        if ignores is not None:
            if tuple(ignores.shape) != tuple(preds.shape):
                raise ValueError(f"ignores shape {tuple(ignores.shape)} != preds shape {tuple(preds.shape)}")
            valid = ~ignores.reshape(b, -1)
            p, t = p & valid, t & valid
        inter = (p & t).sum(-1).tolist()
        n_pred = p.sum(-1).tolist()
        n_tgt = t.sum(-1).tolist()
        ids = list(ref_ids) if ref_ids is not None else [None] * b
        negs = list(negatives) if negatives is not None else [None] * b
        if len(ids) != b or len(negs) != b:
            raise ValueError(f"batch of {b} samples but {len(ids)} ref_ids and {len(negs)} negatives")
        out: list[float | None] = []
        for i in range(b):
            tgt = bool(has_target[i])
            if negs[i] is not None:
                if negs[i] and tgt:
                    raise ValueError(f"sample {i}: negative=True but the target is not empty")
                tgt = not negs[i]
            out.append(
                self.update_counts(
                    intersection=int(inter[i]),
                    union=int(n_pred[i] + n_tgt[i] - inter[i]),
                    pred_pixels=int(n_pred[i]),
                    has_target=tgt,
                    ref_id=ids[i],
                )
            )
        return out

    def update_counts(
        self,
        *,
        intersection: int,
        union: int,
        pred_pixels: int,
        has_target: bool,
        ref_id: Hashable | None = None,
    ) -> float | None:
        """Add one sample from its pixel counts (ignore pixels already excluded).

        Args:
            intersection: ``|pred ∩ target|``.
            union: ``|pred ∪ target|``.
            pred_pixels: ``|pred|`` (decides whether the prediction is empty).
            has_target: False for a no-target / negative sample.
            ref_id: the sample's ref for ``r`` / ``rIoU``, or None.

        Returns:
            The sample IoU, or None when ``union == 0``.

        Raises:
            ValueError: the counts are inconsistent (``0 ≤ I ≤ |pred| ≤ U``; no target ⇒
                ``I == 0`` and ``U == |pred|``).
        """
        if not 0 <= intersection <= pred_pixels <= union:
            raise ValueError(
                f"inconsistent counts: intersection {intersection}, pred_pixels {pred_pixels}, union {union}"
            )
        if not has_target and (intersection != 0 or union != pred_pixels):
            raise ValueError(
                f"no-target sample needs intersection 0 and union == pred_pixels, got "
                f"intersection {intersection}, union {union}, pred_pixels {pred_pixels}"
            )
        pred_empty = pred_pixels == 0
        iou = intersection / union if union > 0 else None
        self.samples += 1
        self.sum_inter += intersection
        self.sum_union += union
        if has_target:
            if pred_empty:
                self.fp += 1
            else:
                self.tn += 1
            if iou is not None:
                self.n_iou += 1
                self.sum_iou += iou
                self.n_giou += 1
                self.sum_giou += iou
                for k, frac in enumerate(_PREC_FRACTIONS):
                    # IoU ≥ num/den  ⇔  I·den ≥ num·U (exact, U > 0)
                    self.prec_hits[k] += intersection * frac.denominator >= frac.numerator * union
        else:
            if pred_empty:
                self.tp += 1
            else:
                self.fn += 1
            self.n_giou += 1
            self.sum_giou += 1.0 if pred_empty else 0.0
        if ref_id is not None:
            st = self.refs.setdefault(ref_id, _RefStats())
            if has_target:
                st.n_pos += 1
                st.inter_pos += intersection
                st.union_pos += union
            else:
                st.n_neg += 1
                st.neg_empty += pred_empty
                st.neg_pixels += pred_pixels
        return iou

    def merge(self, other: RISMetrics) -> RISMetrics:
        """Add ``other``'s samples to this accumulator (in place) and return ``self``.

        Counters of a ref seen by both are summed, so merging per-worker accumulators gives
        exactly the single-accumulator result.
        """
        if not isinstance(other, RISMetrics):
            raise TypeError(f"can only merge a RISMetrics, got {type(other).__name__}")
        for name in ("samples", "sum_inter", "sum_union", "n_iou", "n_giou", "tp", "fn", "tn", "fp"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sum_iou += other.sum_iou
        self.sum_giou += other.sum_giou
        self.prec_hits = [a + b for a, b in zip(self.prec_hits, other.prec_hits, strict=True)]
        for ref_id, st in other.refs.items():
            self.refs.setdefault(ref_id, _RefStats()).add(st)
        return self

    def compute(self) -> MetricsDict:
        """The metrics so far.

        Returns:
            ``{key: value}`` for every key of :data:`METRIC_KEYS` (fractions in [0, 1], None
            where undefined), then ``"samples"`` (int).
        """
        out: MetricsDict = {
            "cIoU": self.sum_inter / self.sum_union if self.sum_union > 0 else None,
            "mIoU": self.sum_iou / self.n_iou if self.n_iou > 0 else None,
            "gIoU": self.sum_giou / self.n_giou if self.n_giou > 0 else None,
        }
        for x, hits in zip(PREC_THRESHOLDS, self.prec_hits, strict=True):
            out[f"prec@{x}"] = hits / self.n_iou if self.n_iou > 0 else None
        out["n_acc"] = self.tp / (self.tp + self.fn) if self.tp + self.fn > 0 else None
        out["t_acc"] = self.tn / (self.tn + self.fp) if self.tn + self.fp > 0 else None
        out["r"], out["rIoU"] = self._robust()
        out["samples"] = self.samples
        return out

    def _robust(self) -> tuple[float | None, float | None]:
        """``(r, rIoU)`` over the tracked refs (see the module docstring)."""
        with_neg = [st for st in self.refs.values() if st.n_neg > 0]
        if not with_neg:
            return None, None
        r = float(np.mean([st.neg_empty / st.n_neg for st in with_neg]))
        ratios = [
            st.inter_pos / (st.union_pos + st.neg_pixels)
            for st in self.refs.values()
            if st.n_pos > 0 and st.union_pos + st.neg_pixels > 0
        ]
        return r, (float(np.mean(ratios)) if ratios else None)

    def __repr__(self) -> str:
        return f"RISMetrics(samples={self.samples}, refs={len(self.refs)})"
