"""The one input path: images (+ chat turns, + targets) → the model's batch, for training, evaluation
and the pipeline alike.

:class:`Processor` turns items into a :class:`RISBatch` (classic mode without the region pointer) or an
:class:`MLLMBatch`:

* the image letterboxed (:class:`RISTransform`): resized so the longest side is ``S`` and padded
  bottom / right to ``S x S`` (the SAM / LISA convention), as **[0, 1] RGB**; the padding is
  :data:`PAD_COLOR`, the ImageNet mean colour (0 after ImageNet normalisation). Nothing here
  normalises: each part that reads the pixels does, with its own mean / std (the pixel encoder with
  ImageNet's, the vision tower and SAM with theirs: :mod:`mllm_ris.modeling.model`);
* the union target, the valid area (inside the image, not an ignore pixel) and, for MLLM batches,
  ``target_masks (B, T, S, S)``: each target letterboxed (nearest), zero-padded to the largest ``T``,
  ``target_valid (B, T)`` marking real ones (``T = 0`` for negatives and for prompts);
* ``superpixels (B, S, S)`` long: the generator's label map of the *original* image (so a disk
  cache keyed on image content is hit across epochs and sizes), resized nearest into the
  letterbox, ``-1`` on the padding (the projector ignores negative labels);
* ``regions`` (``descriptors=True``): each region's shape crop, CIELAB colour and geometry
  (:func:`mllm_ris.processing.regions.region_descriptors`) on the letterboxed canvas, regions in
  token order (the superpixel projector's :meth:`region_labels` numbering), memoised per canvas;
* the conversation (the chat format, below): given turn by turn (the pipeline's chat
  histories), or one turn per item from the template, answered with one ``[SEG]`` per target or
  ``[REJ]`` when training, left open (a prompt) for inference; right-padded ``input_ids``,
  ``attention_mask`` and ``labels`` (answer tokens only).

A prediction at model resolution maps back to the original image by :func:`unletterbox` (crop the
padding, resize).

**The chat format** (:class:`ChatTemplate`, the grounding tokens, :func:`collate_conversations`): the
chat template of the grounding LLM and its tokenization with answer-only labels.

One conversation about one image (Vicuna v1 / LLaVA style, no system prompt)::

    USER: <image>\\nPlease segment the red circle. ASSISTANT: Sure, it is [SEG].</s>USER: … ASSISTANT: …</s>

With ``image_position="after_question"`` the first turn reads ``USER: Please segment the red
circle.\\n<image> ASSISTANT: …``: in a causal LLM the visual tokens then come after the sentence and
their states can depend on it (``mllm.image_position``).

Answers: one ``[SEG]`` per target (``"Sure, they are [SEG] and [SEG]."``) and ``[REJ]`` when
nothing matches (``"Sorry, there is no such object [REJ]."``). :meth:`ChatTemplate.encode`
tokenizes the prompt pieces and the answers separately (``add_special_tokens=False``), puts bos
(if the tokenizer has one) in front and eos after each answer, and labels only the answer tokens
and their eos; everything else is -100. Any HF tokenizer works (fast or slow).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from mllm_ris.processing.regions import (
    LruMemo,
    RegionDescriptorBatch,
    RegionDescriptors,
    batch_region_descriptors,
    digest,
    region_descriptors,
    token_order_labels,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_TOKEN",
    "PAD_COLOR",
    "QUESTION_TEMPLATES",
    "REJ_TOKEN",
    "SEG_TOKEN",
    "ChatTemplate",
    "EncodedConversation",
    "MLLMBatch",
    "Processor",
    "RISBatch",
    "RISTransform",
    "Turn",
    "answer_text",
    "collate_conversations",
    "collate_ris",
    "letterbox_labels",
    "letterbox_masks",
    "template_corpus",
    "unletterbox",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_COLOR = IMAGENET_MEAN
"""The letterbox padding, [0, 1] RGB: 0 after ImageNet normalisation, as the models were trained."""
DESCRIPTOR_MEMO = 4096  # canvases whose region descriptors a processor keeps (~50 KB each at 48 regions)
SuperpixelFn = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 -> (H, W) int labels


# ------------------------------------------------------------------ the chat format

IMAGE_TOKEN = "<image>"  # where the visual tokens go in the prompt
SEG_TOKEN = "[SEG]"  # one per referred object in an answer
REJ_TOKEN = "[REJ]"  # the answer when nothing matches

IGNORE_INDEX = -100
QUESTION_TEMPLATES: tuple[str, ...] = (
    "Please segment {expr}.",
    "What is {expr} in this image? Please output segmentation mask.",
    "Can you segment {expr} in this image?",
    "Where is {expr}? Please output segmentation mask.",
)
_USER, _ASSISTANT = "USER:", "ASSISTANT:"
ImagePosition = Literal["first", "after_question"]
IMAGE_POSITIONS: tuple[str, ...] = ("first", "after_question")


def answer_text(num_targets: int) -> str:
    """The answer for ``num_targets`` objects: ``[SEG]`` per target, ``[REJ]`` for none."""
    if num_targets < 0:
        raise ValueError(f"num_targets must be >= 0, got {num_targets}")
    if num_targets == 0:
        return f"Sorry, there is no such object {REJ_TOKEN}."
    if num_targets == 1:
        return f"Sure, it is {SEG_TOKEN}."
    segs = [SEG_TOKEN] * num_targets
    return f"Sure, they are {', '.join(segs[:-1])} and {segs[-1]}."


@dataclass
class Turn:
    """One exchange; ``answer=None`` marks the turn the model is asked to answer (a prompt)."""

    question: str
    answer: str | None = None


@dataclass
class EncodedConversation:
    """A tokenized conversation.

    Attributes:
        text: the rendered text (eos written as the tokenizer's eos string).
        input_ids: ``(L,)`` token ids, one ``<image>`` in the first turn.
        labels: ``(L,)``: the id on answer tokens (and the eos closing each answer), -100 elsewhere.
    """

    text: str
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


class ChatTemplate:
    """Question phrasings and the ``USER: … ASSISTANT: …`` layout.

    Args:
        questions: templates with one ``{expr}`` slot.
        seed: seed of the phrasing choice (same seed → same sequence of phrasings).
        image_position: where ``<image>`` goes in the first turn: ``first`` (before the question,
            LLaVA's layout) or ``after_question``.
    """

    def __init__(
        self,
        *,
        questions: Sequence[str] = QUESTION_TEMPLATES,
        seed: int | None = 0,
        image_position: ImagePosition = "first",
    ) -> None:
        if not questions or any("{expr}" not in q for q in questions):
            raise ValueError(f"questions: every template needs an {{expr}} slot, got {list(questions)}")
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"image_position: must be one of {IMAGE_POSITIONS}, got {image_position!r}")
        self.questions = tuple(questions)
        self.image_position: ImagePosition = image_position
        self.rng = np.random.default_rng(seed)

    def laid_out(self, image_position: ImagePosition) -> ChatTemplate:
        """This template (the same phrasings and the same seeded phrasing stream) with ``<image>`` at
        ``image_position``."""
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"image_position: must be one of {IMAGE_POSITIONS}, got {image_position!r}")
        other = copy.copy(self)  # shares self.rng: a copy draws the phrasings self would have drawn
        other.image_position = image_position
        return other

    def question(self, expression: str, *, index: int | None = None) -> str:
        """A question about ``expression``: template ``index`` or a seeded random one."""
        expr = expression.strip().rstrip(".?! ")
        i = int(self.rng.integers(len(self.questions))) if index is None else index
        return self.questions[i].format(expr=expr)

    def turns(self, expressions: Sequence[str], target_counts: Sequence[int | None]) -> list[Turn]:
        """One turn per expression answered for its target count; a count of None leaves the turn open."""
        if len(target_counts) != len(expressions):
            raise ValueError(f"{len(expressions)} expressions but {len(target_counts)} target counts")
        return [
            Turn(self.question(expr), None if n is None else answer_text(int(n)))
            for expr, n in zip(expressions, target_counts, strict=True)
        ]

    def _pieces(self, turns: Sequence[Turn], eos: str) -> list[tuple[str, bool]]:
        """``(text, is_answer)`` pieces in order; the eos closing an answer is its own answer piece."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        pieces: list[tuple[str, bool]] = []
        for i, turn in enumerate(turns):
            if turn.answer is None and i != len(turns) - 1:
                raise ValueError(f"turn {i} has no answer; only the last turn may be left open")
            if i == 0 and self.image_position == "after_question":
                pieces.append((f"{_USER} {turn.question}\n{IMAGE_TOKEN} {_ASSISTANT}", False))
            else:
                head = f"{_USER} {IMAGE_TOKEN}\n" if i == 0 else f"{_USER} "
                pieces.append((f"{head}{turn.question} {_ASSISTANT}", False))
            if turn.answer is not None:
                pieces.append((f" {turn.answer}", True))
                pieces.append((eos, True))
        return pieces

    def render(self, turns: Sequence[Turn], *, eos: str = "</s>") -> str:
        """The conversation as one string."""
        return "".join(text for text, _ in self._pieces(turns, eos))

    def encode(self, turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> EncodedConversation:
        """Tokenize ``turns``; labels keep only answers (+ their eos). An open last turn is a prompt."""
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token; call mllm_ris.modeling.llm.ensure_special_tokens")
        ids: list[int] = []
        labels: list[int] = []
        if tokenizer.bos_token_id is not None:
            ids.append(int(tokenizer.bos_token_id))
            labels.append(IGNORE_INDEX)
        eos = str(tokenizer.eos_token)
        for text, is_answer in self._pieces(turns, eos):
            if text == eos and is_answer:
                piece = [int(tokenizer.eos_token_id)]
            else:
                piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids += piece
            labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
        return EncodedConversation(text=self.render(turns, eos=eos), input_ids=ids, labels=labels)


def collate_conversations(
    encoded: Sequence[EncodedConversation], *, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch → ``input_ids``, ``attention_mask``, ``labels``, each ``(B, L)`` long."""
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids, mask, labels


def template_corpus() -> list[str]:
    """Every question phrasing and answer once (``{expr}`` = "the object"): text for a tokenizer."""
    template = ChatTemplate()
    answers = [answer_text(n) for n in range(4)]
    return [
        template.render([Turn(template.question("the object", index=i), a)])
        for i in range(len(QUESTION_TEMPLATES))
        for a in answers
    ]


# ------------------------------------------------------------------ images, targets, batches


class Sample(Protocol):
    """What :meth:`Processor.__call__` reads of a dataset sample (``mllm_ris.data.RISSample``)."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (T, H, W) bool
    text: str
    ignore: np.ndarray | None
    difficulty: str | None


@dataclass
class RISBatch:
    """A batch for training or inference (one expression per item).

    Attributes:
        images: ``(B, 3, S, S)`` float RGB in [0, 1], letterboxed (padding :data:`PAD_COLOR`).
        targets: ``(B, S, S)`` float in {0, 1}: union of the item's target masks.
        valid: ``(B, S, S)`` bool: inside the image (not padding) and not an ignore pixel.
        has_target: ``(B,)`` bool: False for no-target / negative expressions (and prompts).
        texts: the ``B`` expressions.
        hw: original ``(H, W)`` of each image.
        difficulty: SynthRef difficulty per item (None for real data).
        samples: the source samples when kept (evaluation needs the full-resolution targets).
    """

    images: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    has_target: torch.Tensor
    texts: list[str]
    hw: list[tuple[int, int]]
    difficulty: list[str | None]
    samples: list[Any] = field(default_factory=list)

    def to(self, device: torch.device | str) -> RISBatch:
        """Move the tensors to ``device`` (returns self)."""
        for name in ("images", "targets", "valid", "has_target"):
            setattr(self, name, getattr(self, name).to(device))
        return self


@dataclass
class MLLMBatch(RISBatch):
    """A :class:`RISBatch` plus what MLLM mode needs (``S`` = canvas side, ``L`` = tokens).

    Attributes:
        target_masks: ``(B, T, S, S)`` float in {0, 1}, one per target, zero-padded.
        target_valid: ``(B, T)`` bool, True for real targets.
        superpixels: ``(B, S, S)`` long labels, ``-1`` outside the image; None without a generator.
        input_ids, attention_mask, labels: ``(B, L)`` long; ``labels`` is -100 off the answers (None
            without a tokenizer).
        regions: region descriptors ``(B, K, ...)`` in token order (``descriptors=True``), else None.
    """

    target_masks: torch.Tensor | None = None
    target_valid: torch.Tensor | None = None
    superpixels: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    regions: RegionDescriptorBatch | None = None

    @property
    def target_counts(self) -> torch.Tensor:
        """``(B,)`` long: targets per sample (0 for no-target)."""
        assert self.target_valid is not None
        return self.target_valid.sum(1)

    def to(self, device: torch.device | str) -> MLLMBatch:
        """Move every tensor to ``device`` (returns self)."""
        super().to(device)
        for name in ("target_masks", "target_valid", "superpixels", "input_ids", "attention_mask", "labels"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.regions is not None:
            self.regions = self.regions.to(device)
        return self


# ---------------------------------------------------------------------------------------- letterbox


class RISTransform:
    """The letterbox: one image (and its masks) into an ``size x size`` canvas, top left.

    Args:
        size: output side S in pixels.
    """

    def __init__(self, size: int) -> None:
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        self.size = size
        self.pad = torch.tensor(PAD_COLOR).view(3, 1, 1)

    def scaled_hw(self, h: int, w: int) -> tuple[int, int]:
        """Size of the resized image inside the ``S x S`` canvas."""
        scale = self.size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def image(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 → ``(3, S, S)`` float RGB in [0, 1] (bilinear, antialiased), padding
        :data:`PAD_COLOR`."""
        h, w = image.shape[:2]
        nh, nw = self.scaled_hw(h, w)
        s = self.size
        # (H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]
        img = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0  # one copy
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        canvas = self.pad.expand(3, s, s).clone()
        canvas[:, :nh, :nw] = img
        return canvas

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """``(H, W)`` bool → ``(S, S)`` float in {0, 1} (nearest), 0 on the padding."""
        nh, nw = self.scaled_hw(*mask.shape[:2])
        out = torch.zeros(self.size, self.size)
        out[:nh, :nw] = _resize_mask(mask, nh, nw)
        return out

    def valid(self, hw: tuple[int, int], ignore: np.ndarray | None = None) -> torch.Tensor:
        """``(S, S)`` bool: inside the image and (with ``ignore (H, W)`` bool) not an ignore pixel."""
        nh, nw = self.scaled_hw(*hw)
        valid = torch.zeros(self.size, self.size, dtype=torch.bool)
        valid[:nh, :nw] = True
        if ignore is not None:
            valid[:nh, :nw] &= _resize_mask(ignore, nh, nw) < 0.5
        return valid

    def __call__(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns image ``(3, S, S)`` float, target ``(S, S)`` float, valid ``(S, S)`` bool."""
        target = sample.masks.any(axis=0) if sample.masks.shape[0] else np.zeros(sample.image.shape[:2], bool)
        return self.image(sample.image), self.mask(target), self.valid(sample.image.shape[:2], sample.ignore)


def _resize_mask(mask: np.ndarray, h: int, w: int) -> torch.Tensor:
    """``(H0, W0)`` bool -> ``(h, w)`` float in {0, 1} (nearest)."""
    m = torch.tensor(mask, dtype=torch.float32)[None, None]  # (1, 1, H0, W0)
    return F.interpolate(m, size=(h, w), mode="nearest")[0, 0]


def letterbox_masks(masks: np.ndarray, transform: RISTransform) -> torch.Tensor:
    """``(T, H, W)`` bool → ``(T, S, S)`` float in {0, 1}: resized nearest into the letterbox."""
    t, h, w = masks.shape
    nh, nw = transform.scaled_hw(h, w)
    out = torch.zeros(t, transform.size, transform.size)
    if t:
        m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]  # (T, 1, H, W)
        out[:, :nh, :nw] = F.interpolate(m, size=(nh, nw), mode="nearest")[:, 0]
    return out


def letterbox_labels(labels: np.ndarray, transform: RISTransform) -> torch.Tensor:
    """``(H, W)`` int labels → ``(S, S)`` long: nearest into the letterbox, ``-1`` on the padding."""
    h, w = labels.shape
    nh, nw = transform.scaled_hw(h, w)
    # nearest-neighbour index sampling keeps label ids exact (no float interpolation of ids)
    rows = (torch.arange(nh) * h // nh).clamp_max(h - 1)
    cols = (torch.arange(nw) * w // nw).clamp_max(w - 1)
    src = torch.from_numpy(np.ascontiguousarray(labels)).long()
    out = torch.full((transform.size, transform.size), -1, dtype=torch.long)
    out[:nh, :nw] = src[rows][:, cols]
    return out


def unletterbox(logits: torch.Tensor, hw: tuple[int, int], transform: RISTransform) -> torch.Tensor:
    """Map model-resolution logits back to the original image.

    Args:
        logits: ``(..., s, s)`` at any resolution ``s`` of the letterboxed canvas (e.g. S/4).
        hw: the original ``(H, W)``.

    Returns:
        ``(..., H, W)`` logits (crop the padding, bilinear resize).
    """
    h, w = hw
    nh, nw = transform.scaled_hw(h, w)
    s = logits.shape[-1]
    ch, cw = max(1, round(nh * s / transform.size)), max(1, round(nw * s / transform.size))
    lead = logits.shape[:-2]
    x = logits[..., :ch, :cw].reshape(-1, 1, ch, cw)  # (N, 1, ch, cw) for interpolate
    x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    return x.reshape(*lead, h, w)


def _letterbox_batch(
    transform: RISTransform,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    texts: Sequence[str],
    ignore: Sequence[np.ndarray | None],
    difficulty: Sequence[str | None],
    samples: Sequence[Any],
) -> RISBatch:
    """The :class:`RISBatch` of ``images (H, W, 3)`` with their targets ``masks (T, H, W)``."""
    hw = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    unions = [
        m.any(axis=0) if m.shape[0] else np.zeros(size, dtype=bool) for m, size in zip(masks, hw, strict=True)
    ]
    return RISBatch(
        images=torch.stack([transform.image(im) for im in images]),
        targets=torch.stack([transform.mask(u) for u in unions]),
        valid=torch.stack([transform.valid(size, ig) for size, ig in zip(hw, ignore, strict=True)]),
        has_target=torch.tensor([m.shape[0] > 0 for m in masks], dtype=torch.bool),
        texts=list(texts),
        hw=hw,
        difficulty=list(difficulty),
        samples=list(samples),
    )


def collate_ris(
    samples: Sequence[Sample], transform: RISTransform, *, keep_samples: bool = False
) -> RISBatch:
    """Letterbox and stack dataset samples into a :class:`RISBatch` (no chat, no superpixels)."""
    return _letterbox_batch(
        transform,
        [s.image for s in samples],
        [s.masks for s in samples],
        [s.text for s in samples],
        [s.ignore for s in samples],
        [s.difficulty for s in samples],
        samples if keep_samples else [],
    )


# ---------------------------------------------------------------------------------------- processor


class Processor:
    """Items → the model's batch (module docstring); a DataLoader ``collate_fn`` on dataset samples.

    With neither a tokenizer nor a superpixel generator (classic mode without the region pointer) the
    batch is a plain :class:`RISBatch`, else an :class:`MLLMBatch`.

    Args:
        transform: the letterbox (canvas side ``S``).
        tokenizer: the grounding LLM's tokenizer (with ``<image>``, ``[SEG]``, ``[REJ]`` added); None
            = no chat (classic mode: targets, superpixels and descriptors only).
        template: question phrasings (seeded) of the samples' turns.
        superpixels: label-map generator (e.g. a :class:`SuperpixelCache`); None for patch tokens.
        answers: True to answer the samples' turns (training); False leaves them open (inference).
        keep_samples: keep the source samples in the batch (evaluation needs them).
        descriptors: also compute region descriptors (needs ``superpixels``).
    """

    def __init__(
        self,
        *,
        transform: RISTransform,
        tokenizer: PreTrainedTokenizerBase | None = None,
        template: ChatTemplate | None = None,
        superpixels: SuperpixelFn | None = None,
        answers: bool = True,
        keep_samples: bool = False,
        descriptors: bool = False,
    ) -> None:
        if tokenizer is not None and tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; call mllm_ris.modeling.llm.ensure_special_tokens")
        self.transform = transform
        self.tokenizer = tokenizer
        self.template = template or ChatTemplate()
        self.superpixels = superpixels
        self.answers = answers
        self.keep_samples = keep_samples
        if descriptors and superpixels is None:
            raise ValueError("descriptors: region descriptors need a superpixel generator")
        self.descriptors = descriptors
        # per-canvas descriptors, memoised: rgb2lab and the per-region crops cost ~7 ms per 128 px image,
        # the hash of canvas + label map ~0.05 ms; epochs revisit the same images
        self._memo: LruMemo[RegionDescriptors] = LruMemo(DESCRIPTOR_MEMO)

    def __call__(self, samples: Sequence[Sample]) -> RISBatch:
        """Dataset samples → a batch; each sample's turn from the template (answered when ``answers``)."""
        return self.prepare(
            [s.image for s in samples],
            [s.text for s in samples],
            masks=[s.masks for s in samples],
            ignore=[s.ignore for s in samples],
            difficulty=[s.difficulty for s in samples],
            samples=samples if self.keep_samples else (),
        )

    def prepare(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        *,
        turns: Sequence[Sequence[Turn]] | None = None,
        masks: Sequence[np.ndarray] | None = None,
        ignore: Sequence[np.ndarray | None] | None = None,
        difficulty: Sequence[str | None] | None = None,
        samples: Sequence[Any] = (),
    ) -> RISBatch:
        """``images (H, W, 3)`` uint8 with their expressions → the model's batch.

        Args:
            texts: one expression per image (classic mode's text encoder; the template's turns).
            turns: one conversation per image (the last turn open for a prompt); default one turn per
                expression from the template, answered for ``masks`` when ``answers``.
            masks: ``(T, H, W)`` bool targets per image; default none (prompts).
            ignore: ``(H, W)`` bool pixels left out of ``valid``, or None, per image.
            difficulty: SynthRef difficulty per image.
            samples: kept in the batch (evaluation).
        """
        n = len(images)
        if len(texts) != n or (turns is not None and len(turns) != n):
            raise ValueError(
                f"{n} images but {len(texts)} texts / {n if turns is None else len(turns)} turns"
            )
        if masks is None:
            masks = [np.zeros((0, *im.shape[:2]), dtype=bool) for im in images]
        base = _letterbox_batch(
            self.transform,
            images,
            masks,
            texts,
            [None] * n if ignore is None else ignore,
            [None] * n if difficulty is None else difficulty,
            samples,
        )
        if self.tokenizer is None and self.superpixels is None:
            return base  # nothing beyond the letterbox
        t_max = max((m.shape[0] for m in masks), default=0)
        size = self.transform.size
        targets = torch.zeros(n, t_max, size, size)
        target_valid = torch.zeros(n, t_max, dtype=torch.bool)
        encoded = []
        for i, (m, text) in enumerate(zip(masks, texts, strict=True)):
            t = m.shape[0]
            targets[i, :t] = letterbox_masks(m, self.transform)
            target_valid[i, :t] = True
            if self.tokenizer is not None:
                conv = (
                    turns[i]
                    if turns is not None
                    else self.template.turns([text], [t if self.answers else None])
                )
                encoded.append(self.template.encode(conv, self.tokenizer))
        input_ids = attention_mask = labels = None
        if self.tokenizer is not None:
            pad = int(self.tokenizer.pad_token_id)  # type: ignore[arg-type]
            input_ids, attention_mask, labels = collate_conversations(encoded, pad_id=pad)
        superpixels, regions = None, None
        if self.superpixels is not None:
            superpixels = torch.stack(
                [letterbox_labels(self.superpixels(im), self.transform) for im in images]
            )  # (B, S, S)
            if self.descriptors:
                regions = self._descriptors(base.images, superpixels)
        return MLLMBatch(
            **{f: getattr(base, f) for f in RISBatch.__dataclass_fields__},
            target_masks=targets,
            target_valid=target_valid,
            superpixels=superpixels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            regions=regions,
        )

    def _descriptors(self, images: torch.Tensor, superpixels: torch.Tensor) -> RegionDescriptorBatch:
        """Descriptors of the letterboxed canvases ``images (B, 3, S, S)`` ([0, 1] RGB) over
        ``superpixels (B, S, S)``, regions numbered as the superpixel projector numbers its tokens;
        memoised per (canvas, label map), the last :data:`DESCRIPTOR_MEMO` of them."""
        canvas = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()  # (B, S, S, 3) uint8
        dense = token_order_labels(superpixels).numpy()  # (B, S, S), ids 0..K_b-1, -1 = none
        per_image = []
        for c, d in zip(canvas, dense, strict=True):
            key = digest(c, d)
            found = self._memo.get(key)
            if found is None:
                found = region_descriptors(c, d)
                self._memo.put(key, found)
            per_image.append(found)
        return batch_region_descriptors(per_image)
