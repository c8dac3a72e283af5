"""S²RM: Spatial Semantic Recurrent Mining (Yang, Zhang, Sun, Lu, arXiv 2405.09006) as one fusion block.

The block follows the paper's trilogy; this is our own implementation of its description:

1. **Distributing language** (:class:`LanguageDistributor`): every pixel attends over the language
   tokens (the target query + the word states), so each location receives its own mixture of words
   — a *distribution-aware* language map ``L (N, C, H, W)``. It is *constraint-weak*: the map is not
   forced to equal the sentence vector anywhere, it is only modulated channel-wise by the query.
2. **Spatial-semantic recurrent co-parsing** (:class:`BiSliceScan`): the vision map is the *parsed
   context*, the language map the *generator context*. Rows are slices; the maps are rotated
   (H <-> W transpose) so that columns become rows too. A gated (GRU-like) recurrence scans the
   slices top->bottom, bottom->top, left->right and right->left; at each step the gates correlate
   the current vision slice, the current language slice and the carried state, so the state moves
   language semantics from near *and* remote slices to the current vision slice (update gates
   start with log-spread memory spans, so some channels keep remote slices). The row scans run
   first; the column scans read the language map enriched with the two row parses, so every
   column-parse pixel depends on every input pixel (global, bidirectional, structured) at cost
   linear in ``H W`` and with ``H + W`` sequential steps.
3. **Parsed-semantic balancing** (:class:`ParsedSemanticBalance`): softmax gates predicted from the
   candidates themselves (self-distilled weights, per pixel plus a global term) weigh the four
   directional parses and the local vision–language fusion, giving the fused map ``F``.

Ablation flags: ``coparse=False`` skips step 2 (``F`` comes from a local fusion of ``V`` and ``L``
only; then nothing in the block reaches beyond a 3x3 neighbourhood), ``balance=False`` replaces
the gates of step 3 by a plain average.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from s2rm_head.heads._blocks import LayerNorm2d, conv_norm_act

__all__ = ["S2RM", "BiSliceScan", "LanguageDistributor", "ParsedSemanticBalance", "S2RMOutput"]


class S2RMOutput(NamedTuple):
    """What one S²RM block returns (a ``NamedTuple`` so that ZeRO-3's hooks see the tensors, as
    :class:`~s2rm_head.types.HeadOutput`).

    Attributes:
        fused: ``(N, C, H, W)`` fused vision–language map ``F``.
        language: ``(N, C, H, W)`` the distributed language map ``L`` (step 1).
        weights: ``(N, K, H, W)`` balancing weights (softmax over ``K = 5``: local fusion, top->bottom,
            bottom->top, left->right, right->left), or ``None`` when there are no gates
            (``coparse=False`` or ``balance=False``).
    """

    fused: torch.Tensor
    language: torch.Tensor
    weights: torch.Tensor | None


class LanguageDistributor(nn.Module):
    """Step 1: pixel-to-language attention producing a per-pixel language map.

    Queries are the pixels, keys/values are ``[target query; word states]``. The target query is
    always a valid key, so a sample without word states (``L = 0``, MLLM mode) still works.
    Cost: ``O(H W (L+1) C)`` time and ``O(H W (L+1))`` attention memory per head — never ``(HW)^2``.
    """

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.pix_norm = nn.LayerNorm(dim)
        self.lang_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.modulate = nn.Linear(dim, dim)
        self.out_norm = LayerNorm2d(dim)

    def forward(
        self, vis: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        """Distribute the language over the pixels.

        Args:
            vis: ``(N, C, H, W)`` vision map.
            tokens: ``(N, L, C)`` word states (``L`` may be 0).
            token_mask: ``(N, L)`` bool, True for real words.
            query: ``(N, C)`` the target query.

        Returns:
            ``(N, C, H, W)`` language map ``L``.
        """
        n, c, h, w = vis.shape
        pix = vis.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, HW, C): one attention query per pixel
        lang = self.lang_norm(torch.cat([query[:, None, :], tokens], dim=1))  # (N, 1+L, C)
        keep = torch.cat([token_mask.new_ones(n, 1), token_mask], dim=1)  # (N, 1+L), query always kept
        out, _ = self.attn(self.pix_norm(pix), lang, lang, key_padding_mask=~keep, need_weights=False)
        out = out.transpose(1, 2).reshape(n, c, h, w)  # (N, HW, C) -> (N, C, H, W)
        gate = 1.0 + torch.tanh(self.modulate(query))  # (N, C) in (0, 2): soft, constraint-weak modulation
        return self.out_norm(out * gate[:, :, None, None])  # (N, C, H, W)


class BiSliceScan(nn.Module):
    """Step 2 for one axis: a gated recurrence over the row slices of a map, in both directions.

    Slice ``i`` of the input is row ``i`` (``(N, C, W)``); rotate the maps (transpose H and W) to
    scan columns. Per direction and step ``i`` (``v_i``, ``l_i`` the vision and language slices,
    ``h`` the carried state, ``U`` a 1-D conv along the slice):

    .. code-block:: text

        z = sigmoid(Wz [v_i, l_i, v_i*l_i] + Uz h)     update gate: what of this slice to take in
        r = sigmoid(Wr [v_i, l_i, v_i*l_i] + Ur h)     reset gate: what of the carried context to use
        n = tanh(Wn [l_i, v_i*l_i] + r * Un h)         candidate from the generator (language) context
        h = (1 - z) * h + z * n                         output slice i of this direction

    The input projections ``W`` are pointwise and computed for all slices at once; only the
    recurrence loops, over the ``S`` slices, with both directions in one grouped conv ``U`` (the
    only op that mixes positions along a slice: ``k`` neighbours per step).
    Cost per call: ``O(S W C^2 k)`` time, ``O(N C S W)`` activation memory (linear in ``H W``).
    """

    def __init__(self, *, dim: int, kernel_size: int, max_span: int = 32) -> None:
        super().__init__()
        k = kernel_size
        # gates z, r for both directions from [v, l, v*l]: 3C -> 2 dirs x 2 gates x C (per pixel)
        self.gate_in = nn.Conv2d(3 * dim, 4 * dim, kernel_size=1)
        # candidate content for both directions from the generator context [l, v*l]: 2C -> 2 dirs x C
        self.cand_in = nn.Conv2d(2 * dim, 2 * dim, kernel_size=1)
        # state transition, one group per direction: (N, 2C, W) -> (N, 2 dirs x (z, r, n) x C, W)
        self.state = nn.Conv1d(2 * dim, 6 * dim, kernel_size=k, padding=k // 2, groups=2, bias=False)
        self._init_memory(dim, max_span)

    @torch.no_grad()
    def _init_memory(self, dim: int, max_span: int) -> None:
        """Chrono initialisation of the update gates (Tallec & Ollivier, ICLR 2018).

        Channel ``c`` starts with a keep-rate ``1 - z ~ 1 - 1/T_c``, ``T_c`` spread log-uniformly over
        ``[1, max_span]`` slices: some channels carry near slices, others remote ones. With the usual
        zero bias every channel forgets half of its state per slice, and a corner's influence on the
        far side of a 32-slice map would vanish (~1e-13) before training starts.
        """
        bias = self.gate_in.bias.view(2, 2, dim)  # (dirs, [z r], C) view of the (4C,) bias
        spans = torch.logspace(0.0, math.log10(max_span), dim)  # (C,) log-uniform in [1, max_span]
        bias[:, 0] = -torch.log(spans.clamp_min(1.0 + 1e-3) - 1.0)  # sigmoid(bias) = 1 / span

    def forward(self, vis: torch.Tensor, lang: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scan the rows of ``vis``/``lang`` (both ``(N, C, S, W)``) forwards and backwards.

        Returns:
            ``(forward, backward)``, each ``(N, C, S, W)``: the state after slice ``i`` of the scan
            from slice 0 upwards, and of the scan from slice ``S-1`` downwards.
        """
        n, c, s, w = vis.shape
        corr = vis * lang  # (N, C, S, W) element-wise vision-language correlation
        gates = self.gate_in(torch.cat([vis, lang, corr], dim=1))  # (N, 4C, S, W) = [dir0: z r | dir1: z r]
        cand = self.cand_in(torch.cat([lang, corr], dim=1))  # (N, 2C, S, W) = [dir0 n | dir1 n]
        # (N, 2, 2C, S, W) ‖ (N, 2, C, S, W) -> (N, 2 dirs, 3C = [z r n], S, W)
        x = torch.cat([gates.view(n, 2, 2 * c, s, w), cand.view(n, 2, c, s, w)], dim=2)
        x = x.permute(3, 0, 1, 2, 4).contiguous()  # -> (S, N, 2, 3C, W): slice-major, one copy
        # S x (N, 3C, W) per direction, split once: indexing x[i] inside the loop would make the
        # backward zero-fill a full-size gradient buffer at every step
        dir0, dir1 = x[:, :, 0].unbind(0), x[:, :, 1].unbind(0)
        h = vis.new_zeros(n, 2, c, w)  # (N, 2 dirs, C, W) carried state
        fwd, bwd = [], []
        for i in range(s):
            # step i: direction 0 reads slice i, direction 1 reads slice S-1-i
            xi = torch.stack([dir0[i], dir1[s - 1 - i]], dim=1)  # (N, 2, 3C, W)
            # (N, 2, C, W) -> (N, 2C, W) for the grouped conv (group d reads only direction d's state)
            hh = self.state(h.reshape(n, 2 * c, w)).view(n, 2, 3 * c, w)  # (N, 2, 3C, W)
            xz, xr, xn = xi.chunk(3, dim=2)  # each (N, 2, C, W)
            hz, hr, hn = hh.chunk(3, dim=2)  # each (N, 2, C, W)
            z = torch.sigmoid(xz + hz)
            r = torch.sigmoid(xr + hr)
            h = (1.0 - z) * h + z * torch.tanh(xn + r * hn)
            fwd.append(h[:, 0])
            bwd.append(h[:, 1])
        # S x (N, C, W) -> (N, C, S, W); the backward list is reversed so slice i sits at index i
        return torch.stack(fwd, dim=2), torch.stack(bwd[::-1], dim=2)


class ParsedSemanticBalance(nn.Module):
    """Step 3: self-distilled softmax weights over ``K`` candidate maps.

    Gate logits come from the candidates themselves: a per-pixel 1x1-conv branch plus a global
    branch on their spatial mean (so the balance can also depend on the whole image).
    Cost ``O(H W K C^2)``.
    """

    def __init__(self, *, dim: int, num_inputs: int) -> None:
        super().__init__()
        self.local = nn.Sequential(
            nn.Conv2d(num_inputs * dim, dim, kernel_size=1),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, num_inputs, kernel_size=1),
        )
        self.glob = nn.Linear(num_inputs * dim, num_inputs)

    def forward(self, cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cands (N, K, C, H, W)`` -> ``(balanced (N, C, H, W), weights (N, K, H, W))``."""
        flat = cands.flatten(1, 2)  # (N, K, C, H, W) -> (N, K*C, H, W)
        logits = self.local(flat) + self.glob(flat.mean((2, 3)))[:, :, None, None]  # (N, K, H, W)
        weights = logits.softmax(dim=1)  # (N, K, H, W), sums to 1 over K
        return (weights.unsqueeze(2) * cands).sum(1), weights  # (N, C, H, W), (N, K, H, W)


class S2RM(nn.Module):
    """One S²RM fusion block: distribute language -> recurrent co-parsing -> balancing.

    Cost for an ``(N, C, H, W)`` map with ``L`` words: ``O(H W C (L + C k))`` time and
    ``O(N C H W)`` memory; the recurrence runs ``H + W`` sequential steps (rows, then columns).

    Args:
        dim: channels ``C`` of the vision map, the words and the query.
        num_heads: heads of the language-distribution attention.
        coparse: run step 2; if False the block is purely local (``F`` from ``[V, L, V*L]``) and
            ``balance`` has no effect (a single candidate is left).
        balance: step 3 with self-distilled softmax gates; if False the five candidates are averaged.
        scan_kernel: odd kernel of the recurrence's convolutions along a slice.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 4,
        coparse: bool = True,
        balance: bool = True,
        scan_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.coparse = coparse
        self.distribute = LanguageDistributor(dim=dim, num_heads=num_heads)
        # local vision-language fusion [V, L, V*L]: the "input" candidate of the balance
        self.local = conv_norm_act(3 * dim, dim, kernel_size=1)
        self.balance: ParsedSemanticBalance | None = None
        if coparse:
            self.row_scan = BiSliceScan(dim=dim, kernel_size=scan_kernel)  # top->bottom, bottom->top
            self.row_mix = nn.Conv2d(2 * dim, dim, kernel_size=1)  # vertical parses -> column generator
            self.col_scan = BiSliceScan(dim=dim, kernel_size=scan_kernel)  # left->right, right->left
            # one 1x1 projection per direction (groups=4) from the tanh-bounded states to feature scale
            self.parse_proj = nn.Sequential(nn.Conv2d(4 * dim, 4 * dim, kernel_size=1, groups=4), nn.GELU())
            if balance:
                self.balance = ParsedSemanticBalance(dim=dim, num_inputs=5)
        self.out = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False), LayerNorm2d(dim))
        self.norm = LayerNorm2d(dim)

    def forward(
        self, vis: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, query: torch.Tensor
    ) -> S2RMOutput:
        """Fuse language into one vision map.

        Args:
            vis: ``(N, C, H, W)`` vision features (N = batch x targets).
            tokens: ``(N, L, C)`` word states; ``token_mask``: ``(N, L)`` bool.
            query: ``(N, C)`` the target query.

        Returns:
            :class:`S2RMOutput` with ``fused (N, C, H, W)``.
        """
        n, c, h, w = vis.shape
        lang = self.distribute(vis, tokens, token_mask, query)  # (N, C, H, W)
        local = self.local(torch.cat([vis, lang, vis * lang], dim=1))  # (N, 3C, H, W) -> (N, C, H, W)
        weights = None
        if not self.coparse:
            balanced = local
        else:
            top_down, bottom_up = self.row_scan(vis, lang)  # each (N, C, H, W)
            # the column scans read a generator context that already holds the vertical parses, so
            # each of their outputs depends on every pixel of the map (global reach in two passes)
            gen = lang + self.row_mix(torch.cat([top_down, bottom_up], dim=1))  # (N, 2C, H, W) -> (N, C, ...)
            # rotate: (N, C, H, W) -> (N, C, W, H) so columns become row slices; scan; rotate back
            left_right, right_left = self.col_scan(vis.transpose(2, 3), gen.transpose(2, 3))
            left_right, right_left = left_right.transpose(2, 3), right_left.transpose(2, 3)  # (N, C, H, W)
            parses = torch.cat([top_down, bottom_up, left_right, right_left], dim=1)  # (N, 4C, H, W)
            parses = self.parse_proj(parses).view(n, 4, c, h, w)  # (N, 4C, H, W) -> (N, 4, C, H, W)
            cands = torch.cat([local[:, None], parses], dim=1)  # (N, 5, C, H, W)
            if self.balance is None:
                balanced = cands.mean(1)  # (N, C, H, W) plain average (ablation)
            else:
                balanced, weights = self.balance(cands)  # (N, C, H, W), (N, 5, H, W)
        fused = self.norm(vis + self.out(balanced))  # residual on the vision map, (N, C, H, W)
        return S2RMOutput(fused=fused, language=lang, weights=weights)
