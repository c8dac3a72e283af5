"""The one sample type every loader returns, and the base class of all referring datasets.

A *ref* is one set of referred objects in one image (one object for RefCOCO, several or none
for gRefCOCO) together with the sentences that describe it. A *sample* is one sentence of one
ref with its image and target masks; datasets are indexed by sample.

Conventions (shared by every loader, ``data check`` and the metrics):

* ``RISSample.masks`` is ``(T, H, W)`` bool, one mask per target instance; ``T == 0`` means
  the sentence refers to nothing (gRefCOCO no-target ref, R-RefCOCO negative sentence,
  SynthRef negative).
* A sentence is *negative* when its target is empty; ``Sentence.exist`` is False for it.
* ``RISSample.ignore`` is ``(H, W)`` bool or None: pixels excluded from every metric (ReasonSeg).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RISSample", "RefEntry", "ReferringDataset", "Sentence"]

RefId = int | str


@dataclass(frozen=True)
class Sentence:
    """One referring expression of a ref.

    Attributes:
        text: the expression as written in the dataset (``sent`` / ``raw`` / ``sentence``).
        sent_id: the dataset's sentence id (unique within the dataset).
        exist: False for a negative sentence (R-RefCOCO ``exist: false`` or any sentence of a
            no-target ref); its target is empty.
        difficulty: SynthRef difficulty level (``simple``, ``spatial``, ``relational``,
            ``multi``, ``negative``); None for real datasets.
    """

    text: str
    sent_id: RefId
    exist: bool = True
    difficulty: str | None = None


@dataclass(frozen=True)
class RefEntry:
    """One referred object set in one image, with all its sentences (no pixels loaded).

    Attributes:
        ref_id: the dataset's ref id.
        image_id: the dataset's image id.
        image_path: absolute path of the image file.
        height, width: image size as recorded by the annotation (checked when the image loads).
        split: the split this ref belongs to.
        sentences: the ref's sentences, positive and negative.
        target_ids: annotation / segment ids of the targets; empty for a no-target ref.
        payload: loader-private data needed to decode the masks (e.g. COCO segmentations).
    """

    ref_id: RefId
    image_id: RefId
    image_path: Path
    height: int
    width: int
    split: str
    sentences: tuple[Sentence, ...]
    target_ids: tuple[RefId, ...]
    payload: Any = field(default=None, compare=False, repr=False)

    @property
    def no_target(self) -> bool:
        """True when the ref refers to nothing."""
        return len(self.target_ids) == 0


@dataclass
class RISSample:
    """One referring sample: an image, one expression and its target masks.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        masks: ``(T, H, W)`` bool, one per target instance; ``T == 0`` for no target.
        text: the expression.
        dataset: loader name (``refcoco``, ``grefcoco``, ``synthref`` ...).
        split: split name.
        image_id, ref_id, sent_id: the dataset's ids.
        exist: False when the expression refers to nothing (then ``T == 0``).
        ignore: ``(H, W)`` bool pixels excluded from metrics, or None.
        difficulty: SynthRef difficulty level, None elsewhere.
        image_path: where the image was read from.
    """

    image: np.ndarray
    masks: np.ndarray
    text: str
    dataset: str
    split: str
    image_id: RefId
    ref_id: RefId
    sent_id: RefId
    exist: bool = True
    ignore: np.ndarray | None = None
    difficulty: str | None = None
    image_path: str = ""

    @property
    def no_target(self) -> bool:
        """True when the expression has no target (``masks.shape[0] == 0``)."""
        return self.masks.shape[0] == 0

    @property
    def target(self) -> np.ndarray:
        """Union of all target masks, ``(H, W)`` bool (all False when there is no target)."""
        if self.masks.shape[0] == 0:
            return np.zeros(self.image.shape[:2], dtype=bool)
        return self.masks.any(axis=0)


class ReferringDataset(ABC):
    """Base class of every loader: a sequence of :class:`RISSample`, one per sentence.

    Subclasses parse their annotation files into :class:`RefEntry` objects in ``__init__`` and
    call ``super().__init__(refs, ...)``; they implement :meth:`load_masks` (and
    :meth:`load_ignore` when the dataset has ignore regions). Pixels are only read in
    ``__getitem__``, so constructing a dataset is cheap and a ``DataLoader`` can use it as is.
    """

    def __init__(self, refs: Sequence[RefEntry], *, name: str, split: str | None) -> None:
        self.name = name
        self.split = split
        self.refs: list[RefEntry] = list(refs)
        # (ref index, sentence index) for every sentence, in file order.
        self._index: list[tuple[int, int]] = [
            (ri, si) for ri, ref in enumerate(self.refs) for si in range(len(ref.sentences))
        ]

    def __len__(self) -> int:
        return len(self._index)

    def entry(self, idx: int) -> tuple[RefEntry, Sentence]:
        """Sample ``idx``'s ref and sentence: its annotations without reading the image or masks."""
        ri, si = self._index[idx]
        ref = self.refs[ri]
        return ref, ref.sentences[si]

    def __getitem__(self, idx: int) -> RISSample:
        ref, sent = self.entry(idx)
        image = self.load_image(ref)
        if sent.exist and not ref.no_target:
            masks = self.load_masks(ref)
        else:
            masks = np.zeros((0, ref.height, ref.width), dtype=bool)
        return RISSample(
            image=image,
            masks=masks,
            text=sent.text,
            dataset=self.name,
            split=ref.split,
            image_id=ref.image_id,
            ref_id=ref.ref_id,
            sent_id=sent.sent_id,
            exist=sent.exist and not ref.no_target,
            ignore=self.load_ignore(ref),
            difficulty=sent.difficulty,
            image_path=str(ref.image_path),
        )

    def __iter__(self) -> Iterator[RISSample]:
        for i in range(len(self)):
            yield self[i]

    def load_image(self, ref: RefEntry) -> np.ndarray:
        """Read the ref's image as ``(H, W, 3)`` uint8 and check it matches the annotation size."""
        from mllm_ris.data.images import read_image  # datasets only (inference has its arrays)

        return read_image(ref.image_path, expect_hw=(ref.height, ref.width))

    @abstractmethod
    def load_masks(self, ref: RefEntry) -> np.ndarray:
        """Decode the ref's target masks, ``(T, H, W)`` bool with ``T == len(ref.target_ids)``."""

    def load_ignore(self, ref: RefEntry) -> np.ndarray | None:
        """Pixels to exclude from metrics, ``(H, W)`` bool, or None (the default)."""
        return None
