"""Sequence plumbing of the grounding LLM: splice visual tokens in place of ``<image>``, greedy decoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from mllm_ris.modeling.projector import VisualTokens
from mllm_ris.modeling.tokens import IMAGE_TOKEN, TokenCountError

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
