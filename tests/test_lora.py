"""LoRA / QLoRA: which weights train, adapter-free base weights, merge, 4-bit NF4 base on CPU."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.llm import add_grounding_tokens, load_causal_lm, random_causal_lm, train_bpe_tokenizer
from mllm_ris.modeling.lora import apply_lora, base_state_dict
from mllm_ris.modeling.mllm import GroundingMLLM, MLLMConfig, build_grounding_mllm
from mllm_ris.modeling.model_config import LoraSettings
from mllm_ris.modeling.projector import VisualTokens
from mllm_ris.processing.processor import ChatTemplate, Turn, answer_text, collate_conversations

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# widths are multiples of 64, bitsandbytes' 4-bit block size (test_qlora_cpu_widths says why)
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "pad_token_id": 0}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama + BPE tokenizer saved with ``save_pretrained`` (what a 4-bit load reads)."""
    path = tmp_path_factory.mktemp("llama")
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    model = random_causal_lm(arch="llama", vocab_size=len(tokenizer), tie_embeddings=False, **TINY)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def _inputs(model: GroundingMLLM) -> tuple[torch.Tensor, torch.Tensor, VisualTokens, torch.Tensor]:
    template = ChatTemplate()
    encs = [
        template.encode([Turn(template.question(e, index=0), answer_text(n))], model.tokenizer)
        for e, n in (("the red circle", 1), ("both stars", 2))
    ]
    ids, mask, labels = collate_conversations(encs, pad_id=model.tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(0)
    vis = VisualTokens(
        torch.randn(2, 4, model.hidden_size, generator=g), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]) > 0
    )
    return ids, mask, vis, labels


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
    ],
)
def test_lora_settings_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        LoraSettings(**kwargs)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_only_adapters_and_grounding_rows_train(tied: bool) -> None:
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    model = random_causal_lm(arch="qwen2", vocab_size=len(tokenizer), tie_embeddings=tied, **TINY)
    ids = add_grounding_tokens(tokenizer, model).as_list()
    plain_keys = set(model.state_dict())
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, LoraSettings(target_modules=["q_proj", "v_proj"]), token_ids=ids)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any(".q_proj.lora_A" in n for n in trainable) and not any("k_proj" in n for n in trainable)
    deltas = [n for n in trainable if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if tied else 2)  # a tied LM head shares the embedding rows
    embed = peft_model.get_input_embeddings()
    assert embed.token_adapter.token_indices["default"] == ids
    assert type(peft_model.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    # the adapter-free base weights are the plain model's, under the plain keys
    base = base_state_dict(peft_model)
    assert set(base) >= plain_keys - ({"lm_head.weight"} if tied else set())
    assert all(torch.equal(base[k], plain[k]) for k in base)


def test_load_causal_lm_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_causal_lm(tmp_path)


def test_pretrained_folder_base_save_load_and_merge(llm_dir: str, tmp_path: Path) -> None:
    """A base from name_or_path is not copied into the save folder; adapters restore the outputs."""
    torch.manual_seed(0)
    model = build_grounding_mllm(MLLMConfig(name_or_path=llm_dir, seg_dim=8, lora=LoraSettings(dropout=0.0)))
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    ids, mask, vis, labels = _inputs(model)
    with torch.no_grad():
        ref = model(ids, mask, vis, labels)
    model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "llm").exists() and (tmp_path / "m" / "adapter").is_dir()
    loaded = GroundingMLLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        out = loaded(ids, mask, vis, labels)
        torch.testing.assert_close(out.logits, ref.logits)
        loaded.merge_lora()  # export: a plain transformers model with the adapters folded in
        assert isinstance(loaded.llm, type(AutoModelForCausalLM.from_pretrained(llm_dir)))
        merged = loaded(ids, mask, vis, labels)
    torch.testing.assert_close(merged.logits, ref.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not importable: QLoRA (4-bit NF4) cannot be tested")
def test_qlora_4bit_forward_backward_and_round_trip(llm_dir: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    lora = LoraSettings(dropout=0.0)
    cfg = MLLMConfig(
        name_or_path=llm_dir, seg_dim=8, quantization="4bit", lora=lora, gradient_checkpointing=True
    )
    model = build_grounding_mllm(cfg, device="cpu").train()
    base = model.llm.get_base_model()
    assert base.is_loaded_in_4bit
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit" and q_proj.base_layer.weight.quant_type == "nf4"
    ids, mask, vis, labels = _inputs(model)
    out = model(ids, mask, vis, labels, target_counts=[1, 2])
    assert torch.isfinite(out.loss) and out.seg_embeds.shape == (2, 2, 8)
    (out.loss + out.seg_embeds.sum() + out.reject_logit.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert any("embed_tokens.token_adapter" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert grads["seg_mlp.0.weight"].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        ref = model(ids, mask, vis, labels)
    model.save_pretrained(tmp_path / "q")
    loaded = GroundingMLLM.from_pretrained(tmp_path / "q", device="cpu")
    assert loaded.llm.get_base_model().is_loaded_in_4bit
    with torch.no_grad():
        out = loaded(ids, mask, vis, labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.seg_embeds, ref.seg_embeds, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not importable: QLoRA (4-bit NF4) cannot be tested")
def test_qlora_cpu_widths(llm_dir: str, tmp_path: Path) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU kernel (on AVX512-BF16 CPUs, in eval mode) with
    ``absmax.reshape(out, in // 64)``: widths below the 64-wide block fail there ("shape '[32, 0]' is
    invalid"), real widths pass. A narrow model is refused at load time, naming the field."""
    tokenizer = train_bpe_tokenizer()
    narrow = random_causal_lm(
        arch="llama", vocab_size=len(tokenizer), tie_embeddings=False, **{**TINY, "hidden_size": 32}
    )
    narrow.save_pretrained(str(tmp_path / "narrow"))
    with pytest.raises(ConfigError, match=r"hidden_size divisible by 64.*hidden_size=32"):
        load_causal_lm(tmp_path / "narrow", quantization="4bit", device="cpu")
    import bitsandbytes.functional as bnbf

    convert = getattr(bnbf, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU repacking step")
    model = load_causal_lm(llm_dir, quantization="4bit", device="cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers
    for layer in layers:  # the repacking the AVX512-BF16 path runs, on copies (pure torch, any CPU)
        state = copy.deepcopy(layer.weight.quant_state)
        packed, state = convert(layer.weight.data.clone(), state)
        assert packed.shape == (layer.out_features, layer.in_features // 2)
        assert state.absmax.shape == (layer.in_features // 64, layer.out_features)


def test_keep_layers_through_build_and_reload(llm_dir: str, tmp_path: Path) -> None:
    """``keep_layers`` truncates a pretrained base when built and again when reloaded (adapters fit)."""
    torch.manual_seed(0)
    cfg = MLLMConfig(name_or_path=llm_dir, seg_dim=8, keep_layers=1, lora=LoraSettings(dropout=0.0))
    model = build_grounding_mllm(cfg).eval()
    assert len(model.llm.get_base_model().model.layers) == 1
    ids, mask, vis, labels = _inputs(model)
    with torch.no_grad():
        ref = model(ids, mask, vis, labels)
    model.save_pretrained(tmp_path / "k")
    loaded = GroundingMLLM.from_pretrained(tmp_path / "k")
    assert len(loaded.llm.get_base_model().model.layers) == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, vis, labels).logits, ref.logits)
