"""Grounding LLM: an HF causal LM that reads visual tokens and emits ``[SEG]`` / ``[REJ]``.

Each sequence holds exactly one ``<image>`` token; it is replaced by that image's ``K_b`` real
visual tokens (``VisualTokens.mask``), and the spliced sequences are re-padded. Grounding
embeddings are read from the last-layer hidden state **at each ``[SEG]`` position** — the state
that consumed the ``[SEG]`` token — in training (teacher forcing) and in :meth:`generate` (the
decoding step that feeds a generated ``[SEG]`` back), so both see the same state. The
no-target logit is read from the hidden state **just before the last answer** (the last prompt
token, ``… ASSISTANT:``): the state that decides between ``Sure, …[SEG]`` and ``Sorry, … [REJ]``
without seeing the answer. With labels the answer is where labels start; without labels the
sequence is taken to be a prompt and its last token is used, which is what :meth:`generate` does.

Here too: the sequence plumbing (:func:`splice_visual_tokens`, greedy KV-cached decoding
:func:`greedy_decode`, :func:`pack_states`) and :func:`build_grounding_mllm` / :func:`load_base_llm`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.llm import (
    IMAGE_TOKEN,
    GroundingTokenIds,
    TokenCountError,
    add_grounding_tokens,
    check_token_counts,
    count_tokens,
    ensure_special_tokens,
    load_causal_lm,
    load_tokenizer,
    random_causal_lm,
)
from mllm_ris.modeling.model_config import MLLMConfig
from mllm_ris.modeling.model_io import check_state_fits
from mllm_ris.modeling.projector import RegionPointer, VisualTokens

if TYPE_CHECKING:  # peft and LoRA (lora.py) are imported where they are used (peft's import costs seconds)
    from peft import PeftModel

__all__ = ["GroundingGeneration", "GroundingMLLM", "GroundingOutput", "MLLMConfig", "build_grounding_mllm"]

_CONFIG_FILE, _HEADS_FILE = "mllm_config.json", "heads.safetensors"
_HEAD_MODULES = ("seg_mlp", "reject_head", "word_mlp", "pointer")  # float32 heads in heads.safetensors

# ------------------------------------------------------- sequence plumbing: splicing, greedy decoding

IGNORE_INDEX = -100
VISUAL_ID = -1  # token id written at visual and padding positions of ``Spliced.token_ids``


@dataclass
class Spliced:
    """Sequences after splicing (``L'`` = longest ``L_b - 1 + K_b``).

    Attributes:
        embeds: ``(B, L', D)``, zeros on padding.
        attention_mask: ``(B, L')`` long.
        position_ids: ``(B, L')`` long, 0.. over real tokens (padding side does not matter).
        token_ids: ``(B, L')`` long, ``VISUAL_ID`` at visual and padding positions.
        labels: ``(B, L')`` with -100 at visual / padding positions, or None.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_ids: torch.Tensor
    labels: torch.Tensor | None


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """``mask (B, L)`` bool → ``(B,)`` index of the last True per row, -1 when none."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, idx, -1).max(dim=1).values


def splice_visual_tokens(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: VisualTokens,
    labels: torch.Tensor | None,
    *,
    image_token_id: int,
    left_pad: bool,
) -> Spliced:
    """Replace each sequence's one ``<image>`` by its real visual tokens and re-pad.

    Args:
        text_embeds: ``(B, L, D)`` embeddings of ``input_ids``.
        input_ids, attention_mask: ``(B, L)``; padding (mask 0) may sit on either side — it is dropped.
        visual: ``embeds (B, K, D)``, ``mask (B, K)``: image ``b`` contributes ``mask[b].sum()`` tokens.
        labels: ``(B, L)`` or None.
        left_pad: pad the result on the left (decoding) instead of the right (training).

    Raises:
        TokenCountError: a sequence without or with several ``<image>`` tokens, or batch sizes that differ.
    """
    batch = input_ids.shape[0]
    if visual.embeds.shape[0] != batch:
        raise TokenCountError(f"sequences: {batch}, images (visual token sets): {visual.embeds.shape[0]}")
    if visual.embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"visual tokens have width {visual.embeds.shape[-1]}, the LLM {text_embeds.shape[-1]}"
        )
    valid = attention_mask.bool()
    found = ((input_ids == image_token_id) & valid).sum(dim=1)  # (B,)
    for b, n in enumerate(found.tolist()):
        if n != 1:
            raise TokenCountError(f"sample {b}: {IMAGE_TOKEN} tokens: {n}, images: 1")
    rows_e, rows_id, rows_lab = [], [], []
    for b in range(batch):
        ids = input_ids[b][valid[b]]  # (L_b,) real tokens only
        p = int((ids == image_token_id).nonzero()[0, 0])
        vis = visual.embeds[b][visual.mask[b]].to(text_embeds.dtype)  # (K_b, D)
        emb = text_embeds[b][valid[b]]  # (L_b, D)
        rows_e.append(torch.cat([emb[:p], vis, emb[p + 1 :]]))  # (L_b - 1 + K_b, D)
        fill = ids.new_full((vis.shape[0],), VISUAL_ID)
        rows_id.append(torch.cat([ids[:p], fill, ids[p + 1 :]]))
        if labels is not None:
            lab = labels[b][valid[b]]
            rows_lab.append(torch.cat([lab[:p], torch.full_like(fill, IGNORE_INDEX), lab[p + 1 :]]))
    side = "left" if left_pad else "right"
    embeds = pad_sequence(rows_e, batch_first=True, padding_side=side)  # (B, L', D)
    token_ids = pad_sequence(rows_id, batch_first=True, padding_value=VISUAL_ID, padding_side=side)
    ones = [torch.ones(len(r), dtype=torch.long, device=input_ids.device) for r in rows_id]
    mask = pad_sequence(ones, batch_first=True, padding_side=side)  # (B, L')
    out_labels = None
    if labels is not None:
        out_labels = pad_sequence(rows_lab, batch_first=True, padding_value=IGNORE_INDEX, padding_side=side)
    position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)  # (B, L')
    return Spliced(embeds, mask, position_ids, token_ids, out_labels)


def greedy_decode(
    llm: nn.Module,
    embed: Callable[[torch.Tensor], torch.Tensor],
    sp: Spliced,
    *,
    eos_id: int,
    pad_id: int,
    seg_id: int,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """Greedy KV-cached decoding from left-padded spliced prompts.

    Every generated token is fed back once (the last one only when it is a ``[SEG]``), so each
    ``[SEG]`` has the last-layer state of the step that consumed it.

    Returns:
        ``sequences (B, N)`` (``pad_id`` after eos), ``prompt_hidden (B, L', D)`` (last-layer states
        of the prompt; the last prompt token at ``[:, -1]``), and per sequence the ``(D,)`` states of
        its generated ``[SEG]`` tokens.
    """
    mask, pos = sp.attention_mask, sp.position_ids[:, -1]  # (B, L'), (B,)
    out = llm(
        inputs_embeds=sp.embeds,
        attention_mask=mask,
        position_ids=sp.position_ids,
        use_cache=True,
        output_hidden_states=True,
    )
    prompt_hidden = out.hidden_states[-1]  # (B, L', D)
    batch = mask.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=mask.device)
    tokens: list[torch.Tensor] = []
    seg_states: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        tok = torch.where(done, pad_id, out.logits[:, -1].argmax(dim=-1))  # (B,)
        tokens.append(tok)
        is_seg = (tok == seg_id) & ~done
        done = done | (tok == eos_id)
        if done.all() or (step == max_new_tokens - 1 and not is_seg.any()):
            break  # no state left to compute
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # (B, L' + step + 1)
        pos = pos + 1
        out = llm(
            inputs_embeds=embed(tok[:, None]),  # (B, 1, D)
            attention_mask=mask,
            position_ids=pos[:, None],
            cache=out.cache,  # transformers >= 5.25 names the KV cache `cache` (was past_key_values)
            use_cache=True,
            output_hidden_states=True,
        )
        for b in is_seg.nonzero().flatten().tolist():
            seg_states[b].append(out.hidden_states[-1][b, -1])  # (D,) the state that consumed [SEG]
    sequences = torch.stack(tokens, dim=1) if tokens else mask.new_zeros((batch, 0))  # (B, N)
    return sequences, prompt_hidden, seg_states


def pack_states(states: list[list[torch.Tensor]], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence lists of ``(D,)`` states → ``(B, T, D)`` zero-padded (dtype / device of ``like``)
    and ``(B, T)`` bool validity, ``T`` = the longest list."""
    t_max = max((len(s) for s in states), default=0)
    mask = torch.zeros(len(states), t_max, dtype=torch.bool, device=like.device)
    for b, row in enumerate(states):
        mask[b, : len(row)] = True
    packed = like.new_zeros((len(states), t_max, like.shape[-1]))
    if mask.any():
        packed[mask] = torch.stack([s for row in states for s in row]).to(like.dtype)  # row-major fill
    return packed, mask


# ------------------------------------------------------------------------------ the grounding LLM


def _gather_rows(
    mlp: nn.Module, hidden: torch.Tensor, select: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mlp`` over the selected rows of ``hidden (B, L', D)`` (``select (B, L')`` bool), packed in
    order to ``(B, N, width)`` zero-padded to the longest row, with the ``(B, N)`` validity mask."""
    counts = select.sum(dim=1)  # (B,)
    n_max = int(counts.max()) if counts.numel() else 0
    valid = torch.arange(n_max, device=hidden.device)[None, :] < counts[:, None]  # (B, N)
    # run the MLP even on 0 rows: the output stays connected to its weights (zero grads, not None)
    picked = mlp(hidden[select].to(_head_dtype(mlp)))  # (M, width), row-major = (b, position) order
    packed = picked.new_zeros((hidden.shape[0], n_max, width))
    return packed.masked_scatter(valid[..., None], picked), valid  # fills (b, n) in the same order


def _head_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a head computes in: its weights' (float32, unless DeepSpeed cast the model to bf16 /
    fp16); float32 for a module without weights."""
    return next(module.parameters(), torch.empty(0)).dtype


def _state_mlp(hidden: int, out: int) -> nn.Sequential:
    """LISA's ``text_hidden_fcs`` on LLM states: ``Linear(D, D) → ReLU → Linear(D, out)``."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class GroundingOutput(NamedTuple):
    """Output of :meth:`GroundingMLLM.forward` (``L'`` = length after splicing in the visual tokens).

    A ``NamedTuple`` so that DeepSpeed ZeRO-3's module hooks see its tensors (as ``HeadOutput``).

    Attributes:
        loss: ``()`` LM cross-entropy over answer tokens; None without labels.
        logits: ``(B, L', V)`` next-token logits over the spliced sequence; with ``answer_logits=True``
            ``(N, V)``, only the ``N`` positions that predict an answer token (in row-major order).
        seg_embeds: ``(B, T, Dg)`` grounding embeddings, one per ``[SEG]`` in sequence order,
            zero-padded to the largest ``T`` in the batch (``T`` may be 0).
        seg_valid: ``(B, T)`` bool, True for real embeddings.
        reject_logit: ``(B,)`` no-target logit (sigmoid = probability that nothing matches).
        attention_mask: ``(B, L')`` long of the spliced sequence.
        word_states: ``(B, W, Dg)`` states of the prompt's text tokens (``mllm.word_states``), else None.
        word_mask: ``(B, W)`` bool, True for real word states; None with ``word_states``.
        region_logits: ``(B, T, K)`` each ``[SEG]`` state scored against the output states at the
            ``K`` visual-token positions (``mllm.pointer_dim``; ``K`` = ``visual_tokens`` width, padded
            regions at ``MASKED_LOGIT``), else None.
        presence_logits: ``(B, 1, K)`` the last prompt state scored as a pointer query against the same
            regions (``mllm.reject_from: pointer``; ``reject_logit`` is minus their maximum), else None.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    seg_embeds: torch.Tensor
    seg_valid: torch.Tensor
    reject_logit: torch.Tensor
    attention_mask: torch.Tensor
    word_states: torch.Tensor | None = None
    word_mask: torch.Tensor | None = None
    region_logits: torch.Tensor | None = None
    presence_logits: torch.Tensor | None = None


@dataclass
class GroundingGeneration:
    """Output of :meth:`GroundingMLLM.generate`.

    Attributes:
        text: the ``B`` decoded answers (special tokens kept, eos and padding cut).
        sequences: ``(B, N)`` generated ids, ``pad_token_id`` after eos.
        seg_embeds: ``(B, T, Dg)``, one per generated ``[SEG]``; ``seg_valid (B, T)`` bool.
        reject_logit: ``(B,)`` at the last prompt token.
        word_states, word_mask: as in :class:`GroundingOutput` (the same prompt tokens; None when off).
        region_logits: ``(B, T, K)`` as in :class:`GroundingOutput`, for the generated ``[SEG]`` tokens.
        presence_logits: ``(B, 1, K)`` as in :class:`GroundingOutput` (the last prompt token), or None.
        presence_embed: ``(B, Dg)`` the grounding embedding of that same prompt state (the query a
            ``[SEG]`` gets when the pointer overrules a rejecting answer), or None.
    """

    text: list[str]
    sequences: torch.Tensor
    seg_embeds: torch.Tensor
    seg_valid: torch.Tensor
    reject_logit: torch.Tensor
    word_states: torch.Tensor | None = None
    word_mask: torch.Tensor | None = None
    region_logits: torch.Tensor | None = None
    presence_logits: torch.Tensor | None = None
    presence_embed: torch.Tensor | None = None


class GroundingMLLM(nn.Module):
    """An HF causal LM (optionally peft-wrapped) + the grounding MLP and the reject head.

    Args:
        llm: ``AutoModelForCausalLM`` (or a ``PeftModel`` around one) whose vocab holds the tokens.
        tokenizer: its tokenizer (eos and pad set).
        token_ids: ids of ``<image>``, ``[SEG]``, ``[REJ]``.
        seg_dim: ``Dg``, width of the grounding embeddings.
        config: what the model was built from (written by :meth:`save_pretrained`).
    """

    def __init__(
        self,
        *,
        llm: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        token_ids: GroundingTokenIds,
        seg_dim: int,
        config: MLLMConfig | None = None,
    ) -> None:
        super().__init__()
        if config is not None and config.seg_dim != seg_dim:
            raise ConfigError(f"seg_dim: {seg_dim} given, the config says {config.seg_dim}")
        self.llm = llm
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.cfg = config if config is not None else MLLMConfig(seg_dim=seg_dim)
        hidden = int(llm.get_input_embeddings().weight.shape[1])
        self.hidden_size, self.seg_dim = hidden, seg_dim
        # heads stay in float32
        self.seg_mlp = _state_mlp(hidden, seg_dim)
        self.reject_head = nn.Linear(hidden, 1)
        # word states for the head (DESIGN: "g, optionally word states")
        self.word_mlp = _state_mlp(hidden, seg_dim) if self.cfg.word_states else None
        # DESIGN "the one idea": identify the referent where the LLM sees words and regions together
        self.pointer: RegionPointer | None = None
        if self.cfg.pointer_dim is not None:
            self.pointer = RegionPointer(
                query_dim=hidden,
                region_dim=hidden,
                dim=self.cfg.pointer_dim,
                layers=self.cfg.pointer_layers,
                word_dim=hidden if self.cfg.pointer_words else None,
            )

    # ----------------------------------------------------------------------------- training pass

    def _splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: VisualTokens,
        labels: torch.Tensor | None,
        *,
        left_pad: bool,
    ) -> Spliced:
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, D)
        return splice_visual_tokens(
            embeds,
            input_ids,
            attention_mask,
            visual,
            labels,
            image_token_id=self.token_ids.image,
            left_pad=left_pad,
        )

    def _region_logits(
        self,
        seg_states: torch.Tensor,
        hidden: torch.Tensor,
        sp: Spliced,
        visual: VisualTokens,
        last: torch.Tensor,
    ) -> torch.Tensor | None:
        """``seg_states (B, T, D)`` (last-layer states at ``[SEG]``) against the last-layer states at the
        visual-token positions of ``hidden (B, L', D)`` → ``(B, T, K)`` (``K`` = ``visual.mask`` width;
        region ``k`` of image ``b`` is its ``k``-th visual token); None without a pointer. With
        ``mllm.pointer_words`` the pointer's layers also see the prompt's text-token states (positions
        up to ``last (B,)``)."""
        if self.pointer is None:
            return None
        k = visual.mask.shape[1]
        if self.cfg.pointer_regions == "tokens":  # the visual tokens as the LLM received them
            regions = visual.embeds  # (B, K, D)
        else:
            select = sp.attention_mask.bool() & (sp.token_ids == VISUAL_ID)  # (B, L') spliced visual rows
            regions, _ = _gather_rows(nn.Identity(), hidden, select, hidden.shape[-1])  # (B, K', D), K' <= K
            regions = F.pad(regions, (0, 0, 0, k - regions.shape[1]))  # (B, K', D) -> (B, K, D)
        dtype = _head_dtype(self.pointer)
        words = word_mask = None
        if self.cfg.pointer_words:
            words, word_mask = _gather_rows(
                nn.Identity(), hidden, self._text_rows(hidden, sp, last), hidden.shape[-1]
            )
            words = words.to(dtype)  # (B, W, D)
        return self.pointer(seg_states.to(dtype), regions.to(dtype), visual.mask, words, word_mask)

    @staticmethod
    def _text_rows(hidden: torch.Tensor, sp: Spliced, last: torch.Tensor) -> torch.Tensor:
        """``(B, L')`` True at the prompt's text tokens: real, not visual, at or before ``last (B,)``."""
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None, :]  # (1, L')
        return sp.attention_mask.bool() & (sp.token_ids != VISUAL_ID) & (pos <= last[:, None])

    def _seg_embeddings(
        self, hidden: torch.Tensor, seg_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden (B, L', D)``, ``seg_mask (B, L')`` → ``seg_embeds (B, T, Dg)``, ``seg_valid (B, T)``."""
        return _gather_rows(self.seg_mlp, hidden, seg_mask, self.seg_dim)

    def _word_states(
        self, hidden: torch.Tensor, sp: Spliced, last: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(B, W, Dg)`` states of the text tokens up to position ``last (B,)`` (the prompt; visual
        tokens and padding left out) and their ``(B, W)`` mask; ``(None, None)`` when off."""
        if self.word_mlp is None:
            return None, None
        return _gather_rows(self.word_mlp, hidden, self._text_rows(hidden, sp, last), self.seg_dim)

    def _prompt_end(self, sp: Spliced) -> torch.Tensor:
        """``(B,)`` the last prompt position: before the last answer (labels), else the last real token."""
        pos = last_true(sp.attention_mask.bool())  # (B,) last real token
        if sp.labels is not None:
            answer = sp.labels != IGNORE_INDEX  # (B, L')
            starts = answer & ~F.pad(answer, (1, 0))[:, :-1]  # first token of every answer run
            start = last_true(starts)  # (B,), -1 when the row has no answer
            pos = torch.where(start > 0, start - 1, pos)
        return pos

    def _reject(
        self, state: torch.Tensor, hidden: torch.Tensor, sp: Spliced, visual: VisualTokens, last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reject logit ``(B,)`` of the prompt-end states ``state (B, D)`` (``hidden (B, L', D)``,
        ``last (B,)`` their positions), and with ``mllm.reject_from: pointer`` the presence logits
        ``(B, 1, K)`` it is taken from (minus their maximum: a rejection exactly when no region scores
        above 0), else None. The head reads ``state`` detached with ``reject_detach``."""
        if self.cfg.reject_from == "pointer":
            presence = self._region_logits(state[:, None], hidden, sp, visual, last)  # (B, 1, K)
            assert presence is not None  # reject_from pointer needs pointer_dim (MLLMConfig checks)
            return -presence[:, 0].float().amax(-1), presence
        if self.cfg.reject_detach:
            state = state.detach()
        return self.reject_head(state.to(_head_dtype(self.reject_head))).squeeze(-1), None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: VisualTokens,
        labels: torch.Tensor | None = None,
        *,
        target_counts: torch.Tensor | Sequence[int] | None = None,
        answer_logits: bool = False,
    ) -> GroundingOutput:
        """Teacher-forced pass.

        Args:
            input_ids, attention_mask: ``(B, L)``, one ``<image>`` per sequence, any padding side.
            visual_tokens: ``embeds (B, K, D)``, ``mask (B, K)``.
            labels: ``(B, L)`` with -100 outside answers, or None (no loss).
            target_counts: ``(B,)`` target masks per sample; checked against the ``[SEG]`` count.
            answer_logits: with ``labels``, run the LM head only at the positions that predict an answer
                token (same loss; the head over a 49 k vocabulary at every position was 40 % of
                SmolLM2's step with 4 layers kept); ``logits`` is then ``(N, V)``.

        Raises:
            TokenCountError: wrong ``<image>`` count, or ``[SEG]`` count != ``target_counts``.
        """
        if target_counts is not None:
            found = count_tokens(input_ids, self.token_ids.seg, attention_mask)
            check_token_counts(found.tolist(), target_counts, what="[SEG] tokens", against="target masks")
        sp = self._splice(input_ids, attention_mask, visual_tokens, labels, left_pad=False)
        keep: torch.Tensor | None = None  # (B, L') bool: positions whose next token is an answer token
        if answer_logits and sp.labels is not None:
            keep = F.pad(sp.labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
        out = self.llm(
            inputs_embeds=sp.embeds,
            attention_mask=sp.attention_mask,
            position_ids=sp.position_ids,
            use_cache=False,
            output_hidden_states=True,
            **({} if keep is None else {"logits_to_keep": keep}),
        )
        hidden = out.hidden_states[-1]  # (B, L', D), after the final norm: what the LM head reads
        loss = None
        if sp.labels is not None:
            shifted = sp.labels[:, 1:]  # logits at i predict the token at i + 1
            if keep is not None:  # logits (N, V) at the kept positions already
                logits, targets = out.logits, shifted[keep[:, :-1]]  # (N, V), (N,)
            else:
                logits, targets = out.logits[:, :-1].flatten(0, 1), shifted.flatten()
            if (targets != IGNORE_INDEX).any():
                loss = F.cross_entropy(logits.float(), targets)
            else:
                loss = out.logits.sum() * 0.0  # a batch without answer tokens
        seg_mask = sp.token_ids == self.token_ids.seg  # (B, L')
        seg_embeds, seg_valid = self._seg_embeddings(hidden, seg_mask)
        region_logits = None
        last = self._prompt_end(sp)
        if self.pointer is not None:
            seg_states, _ = _gather_rows(nn.Identity(), hidden, seg_mask, hidden.shape[-1])  # (B, T, D)
            region_logits = self._region_logits(seg_states, hidden, sp, visual_tokens, last)
        words, word_mask = self._word_states(hidden, sp, last)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        reject_logit, presence = self._reject(hidden[rows, last], hidden, sp, visual_tokens, last)
        return GroundingOutput(
            loss=loss,
            logits=out.logits,
            seg_embeds=seg_embeds,
            seg_valid=seg_valid,
            reject_logit=reject_logit,
            attention_mask=sp.attention_mask,
            word_states=words,
            word_mask=word_mask,
            region_logits=region_logits,
            presence_logits=presence,
        )

    # ------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: VisualTokens,
        *,
        max_new_tokens: int = 32,
    ) -> GroundingGeneration:
        """Greedy KV-cached decoding of prompts ``(B, L)`` (one ``<image>`` each, ending in ``ASSISTANT:``).

        Sequences are left-padded after splicing (explicit position ids), so a prompt decodes the
        same alone or in a batch. Every generated token is fed back once; the last-layer state of
        the step that feeds a ``[SEG]`` gives its grounding embedding (as in :meth:`forward`).
        """
        was_training = self.training
        self.eval()
        try:
            return self._generate(input_ids, attention_mask, visual_tokens, max_new_tokens)
        finally:
            self.train(was_training)

    def _generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: VisualTokens, max_new_tokens: int
    ) -> GroundingGeneration:
        eos = int(self.tokenizer.eos_token_id)
        sp = self._splice(input_ids, attention_mask, visual, None, left_pad=True)
        sequences, prompt_hidden, seg_states = greedy_decode(
            self.llm,
            self.llm.get_input_embeddings(),
            sp,
            eos_id=eos,
            pad_id=int(self.tokenizer.pad_token_id),
            seg_id=self.token_ids.seg,
            max_new_tokens=max_new_tokens,
        )
        prompt_state = prompt_hidden[:, -1]  # (B, D) the last prompt token (left padding)
        last = torch.full(
            (prompt_state.shape[0],), prompt_hidden.shape[1] - 1, dtype=torch.long, device=prompt_state.device
        )  # (B,)
        reject_logit, presence = self._reject(prompt_state, prompt_hidden, sp, visual, last)  # (B,), (B,1,K)
        words, word_mask = self._word_states(prompt_hidden, sp, last)
        hidden, seg_mask = pack_states(seg_states, prompt_state)  # (B, T, D), (B, T)
        seg_embeds, seg_valid = self._seg_embeddings(hidden, seg_mask)
        region_logits = self._region_logits(hidden, prompt_hidden, sp, visual, last)  # (B, T, K) or None
        text = [self._decode(row, eos) for row in sequences.tolist()]
        presence_embed = None
        if presence is not None:
            presence_embed = self.seg_mlp(prompt_state.to(_head_dtype(self.seg_mlp)))  # (B, Dg)
        return GroundingGeneration(
            text,
            sequences,
            seg_embeds,
            seg_valid,
            reject_logit,
            words,
            word_mask,
            region_logits,
            presence,
            presence_embed,
        )

    def _decode(self, ids: list[int], eos: int) -> str:
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()

    # ------------------------------------------------------------------------- saving / export

    def merge_lora(self) -> None:
        """Fold the LoRA adapters and token rows into the LLM weights (export; no-op without LoRA)."""
        from mllm_ris.modeling.lora import merge_lora

        self.llm = merge_lora(self.llm)

    def _heads(self) -> dict[str, nn.Module]:
        """The float32 heads this model has, by attribute name (``word_mlp`` only when on)."""
        return {n: getattr(self, n) for n in _HEAD_MODULES if getattr(self, n) is not None}

    def heads_to(self, device: str | torch.device) -> None:
        """Move the float32 heads (grounding / word MLPs, reject head) to ``device``, not the LLM."""
        for head in self._heads().values():
            head.to(device)

    def _heads_state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v for n, head in self._heads().items() for k, v in head.state_dict().items()}

    def save_pretrained(self, path: str | Path, *, write_config: bool = True) -> None:
        """Write ``mllm_config.json``, ``tokenizer/``, ``heads.safetensors``, ``adapter/`` (LoRA + token
        rows) and ``llm/`` (the full LLM without LoRA, or the random base, which no path can rebuild).

        Args:
            write_config: False inside a RISModel folder, whose ``config.json`` holds this config
                (``model.mllm``) once: ``mllm_config.json`` is not written (an old one is removed) and
                :meth:`from_pretrained` is given the config.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        if write_config:
            (folder / _CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        else:
            (folder / _CONFIG_FILE).unlink(missing_ok=True)
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        save_file(
            {k: v.detach().contiguous() for k, v in self._heads_state().items()}, str(folder / _HEADS_FILE)
        )
        from peft import PeftModel

        from mllm_ris.modeling.lora import base_state_dict

        if isinstance(self.llm, PeftModel):
            # the resized embedding matrix is not written (SmolLM2's: 2 x 113 MB): loading resizes the
            # base the same way (new rows = mean of the old ones) and the adapter holds the trained rows
            self.llm.save_pretrained(str(folder / "adapter"), save_embedding_layers=False)
            if self.cfg.name_or_path is None and self.cfg.llava_path is None:
                base = self.llm.get_base_model()
                base.save_pretrained(str(folder / "llm"), state_dict=base_state_dict(self.llm))
        else:
            self.llm.save_pretrained(str(folder / "llm"))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        trainable: bool = False,
        device: str | torch.device | None = None,
        config: MLLMConfig | None = None,
    ) -> GroundingMLLM:
        """Rebuild a model written by :meth:`save_pretrained` (in eval mode).

        Args:
            trainable: resume training (LoRA / token rows, or the whole LLM without LoRA, train;
                checkpointing as configured); False = inference, every weight frozen.
            device: where a quantized base is loaded (see ``load_causal_lm``).
            config: the model's config when the folder's owner holds it (a RISModel folder's
                ``config.json``); None reads the folder's ``mllm_config.json``. Given, a
                ``mllm_config.json`` in the folder (RISModel folders written before the config was
                saved once have one) is not read.
        """
        folder = Path(path)
        if config is not None:
            cfg = config
        elif (folder / _CONFIG_FILE).is_file():
            cfg = MLLMConfig.from_dict(json.loads((folder / _CONFIG_FILE).read_text()))
        else:
            raise CheckpointError(f"{str(folder)!r} is not a GroundingMLLM folder (no {_CONFIG_FILE})")
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        saved = folder / "llm"
        llm = load_base_llm(
            path=saved if saved.is_dir() else cfg.name_or_path,
            llava_path=None if saved.is_dir() else cfg.llava_path,
            quantization=cfg.quantization,
            dtype=cfg.dtype,
            device=device,
            keep_layers=cfg.keep_layers,
        )
        token_ids = add_grounding_tokens(tokenizer, llm)
        if (folder / "adapter").is_dir():
            from mllm_ris.modeling.lora import peft_deprecations_silenced, prepare_for_training

            if trainable:
                llm = prepare_for_training(llm, gradient_checkpointing=cfg.gradient_checkpointing)
            from peft import PeftModel

            with peft_deprecations_silenced():
                llm = PeftModel.from_pretrained(llm, str(folder / "adapter"), is_trainable=trainable)
        elif cfg.lora.enabled:
            raise CheckpointError(f"{str(folder)!r}: config has LoRA enabled but there is no adapter/ folder")
        model = cls(llm=llm, tokenizer=tokenizer, token_ids=token_ids, seg_dim=cfg.seg_dim, config=cfg)
        state = load_file(str(folder / _HEADS_FILE))
        check_state_fits(state, model._heads_state(), name=repr(str(folder / _HEADS_FILE)))
        for name, head in model._heads().items():
            head.load_state_dict(
                {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
            )
        if not trainable:
            model.requires_grad_(False)
        elif cfg.gradient_checkpointing and not (folder / "adapter").is_dir():
            from mllm_ris.modeling.lora import enable_gradient_checkpointing

            enable_gradient_checkpointing(model.llm)
        return model.eval()


def load_base_llm(
    *,
    path: str | Path | None,
    llava_path: str | Path | None = None,
    quantization: Literal["none", "4bit", "8bit"] = "none",
    dtype: str = "float32",
    device: str | torch.device | None = None,
    keep_layers: int | None = None,
) -> PreTrainedModel:
    """The causal LM in ``path`` (see :func:`~mllm_ris.modeling.llm.load_causal_lm`) or, when
    ``llava_path`` is set, a LLaVA checkpoint's (:mod:`~mllm_ris.modeling.llava` is imported only then);
    ``keep_layers`` keeps its first N decoder layers."""
    if llava_path is not None:
        from mllm_ris.modeling.llava import load_llava_checkpoint
        from mllm_ris.modeling.llm import truncate_layers

        if quantization != "none":
            raise ConfigError("quantization: not supported with llava_path; save the language model first")
        llm = load_llava_checkpoint(llava_path, dtype=dtype).llm
        return llm if keep_layers is None else truncate_layers(llm, keep_layers)
    if path is None:
        raise ConfigError("name_or_path: a saved LLM folder is needed here (no random init)")
    return load_causal_lm(
        path, quantization=quantization, dtype=dtype, device=device, keep_layers=keep_layers
    )


def build_grounding_mllm(
    cfg: MLLMConfig,
    *,
    llm: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | torch.device | None = None,
) -> GroundingMLLM:
    """Build the LLM ``cfg`` names (or use ``llm``), add the grounding tokens, apply LoRA / QLoRA.

    Args:
        llm: an already loaded causal LM (e.g. ``load_llava_checkpoint(...).llm``); overrides the paths.
        tokenizer: its tokenizer; default from ``cfg.tokenizer`` (see ``load_tokenizer``).
        device: where a quantized base is loaded.
    """
    model_dir = cfg.llava_path or cfg.name_or_path
    if llm is None and cfg.llava_path is not None:
        from mllm_ris.modeling.llava import load_llava_checkpoint

        parts = load_llava_checkpoint(cfg.llava_path, dtype=cfg.dtype)
        llm, tokenizer = parts.llm, tokenizer or parts.tokenizer
        if cfg.keep_layers is not None:
            from mllm_ris.modeling.llm import truncate_layers

            llm = truncate_layers(llm, cfg.keep_layers)
    elif llm is None and cfg.name_or_path is not None:
        llm = load_causal_lm(
            cfg.name_or_path,
            quantization=cfg.quantization,
            dtype=cfg.dtype,
            device=device,
            keep_layers=cfg.keep_layers,
        )
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer, model_dir=model_dir)
    ensure_special_tokens(tokenizer)
    if llm is None:  # tiny random LLM sized to the tokenizer (grounding tokens included)
        add_grounding_tokens(tokenizer)
        llm = random_causal_lm(
            arch=cfg.random_arch,
            vocab_size=len(tokenizer),
            hidden_size=cfg.random_hidden_size,
            num_layers=cfg.random_num_layers,
            num_heads=cfg.random_num_heads,
            intermediate_size=cfg.random_intermediate_size,
            tie_embeddings=cfg.random_tie_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            dtype=cfg.dtype,
        )
    token_ids = add_grounding_tokens(tokenizer, llm)
    if cfg.lora.enabled:
        from mllm_ris.modeling.lora import apply_lora

        llm = apply_lora(
            llm, cfg.lora, token_ids=token_ids.as_list(), gradient_checkpointing=cfg.gradient_checkpointing
        )
    elif cfg.gradient_checkpointing:
        from mllm_ris.modeling.lora import enable_gradient_checkpointing

        enable_gradient_checkpointing(llm)
    return GroundingMLLM(llm=llm, tokenizer=tokenizer, token_ids=token_ids, seg_dim=cfg.seg_dim, config=cfg)
