"""Chat template of the grounding LLM and its tokenization with answer-only labels.

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "QUESTION_TEMPLATES",
    "REJ_TOKEN",
    "SEG_TOKEN",
    "ChatTemplate",
    "EncodedConversation",
    "Turn",
    "answer_text",
    "collate_conversations",
    "template_corpus",
]

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
