"""GroundingMLLM: splicing visual tokens, [SEG] / [REJ] heads, count checks, save / load, merge, generation,
LLaVA-format checkpoints. Tiny random Llama / Qwen2 LLMs on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.llava import load_llava_checkpoint
from mllm_ris.modeling.llm import TokenCountError, train_bpe_tokenizer
from mllm_ris.modeling.mllm import GroundingMLLM, MLLMConfig, build_grounding_mllm
from mllm_ris.modeling.model_config import LoraSettings
from mllm_ris.modeling.projector import VisualTokens
from mllm_ris.processing.processor import ChatTemplate, Turn, answer_text, collate_conversations

TEMPLATE = ChatTemplate(seed=0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer().save_pretrained(str(path))
    return str(path)


def _build(tok_dir: str, **kwargs: object) -> GroundingMLLM:
    torch.manual_seed(0)
    kwargs.setdefault("lora", LoraSettings(dropout=0.0))
    cfg = MLLMConfig(
        tokenizer=tok_dir, seg_dim=8, random_hidden_size=32, random_intermediate_size=64, **kwargs
    )
    return build_grounding_mllm(cfg).eval()


def _batch(model: GroundingMLLM, items: list[tuple[list[str], list[int | None]]]) -> tuple[torch.Tensor, ...]:
    """``(expressions, target counts)`` per sample → right-padded ``input_ids, attention_mask, labels``."""
    encs = []
    for exprs, counts in items:
        turns = [
            Turn(TEMPLATE.question(e, index=0), None if n is None else answer_text(n))
            for e, n in zip(exprs, counts, strict=True)
        ]
        encs.append(TEMPLATE.encode(turns, model.tokenizer))
    return collate_conversations(encs, pad_id=model.tokenizer.pad_token_id)


def _visual(counts: list[int], dim: int, seed: int = 0) -> VisualTokens:
    """Random tokens, ``counts[b]`` real ones per image, padded to the max (padding = garbage, masked)."""
    g = torch.Generator().manual_seed(seed)
    k = max(counts)
    mask = torch.arange(k)[None, :] < torch.tensor(counts)[:, None]
    return VisualTokens(embeds=torch.randn(len(counts), k, dim, generator=g), mask=mask)


def _perturb_adapters(model: GroundingMLLM) -> None:
    """Make LoRA B matrices and token rows non-trivial (they start at zero / at the base rows)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


ARCHS = [
    {"random_arch": "llama"},
    {"random_arch": "qwen2"},
    {"random_arch": "qwen2", "random_tie_embeddings": True},
]


@pytest.mark.parametrize("arch", ARCHS, ids=["llama", "qwen2", "qwen2-tied"])
def test_forward_backward_reaches_lora_token_rows_and_heads(tok_dir: str, arch: dict) -> None:
    model = _build(tok_dir, **arch).train()
    ids, mask, labels = _batch(model, [(["the red circle"], [1]), (["both stars"], [2])])
    vis = _visual([3, 5], model.hidden_size)
    vis.embeds.requires_grad_(True)  # stands for the projector's output
    out = model(ids, mask, vis, labels, target_counts=[1, 2])
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.logits.shape == (2, ids.shape[1] - 1 + 5, len(model.tokenizer))  # <image> → up to 5 tokens
    assert out.seg_embeds.shape == (2, 2, 8) and out.reject_logit.shape == (2,)
    (out.loss + out.seg_embeds.sum() + out.reject_logit.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert vis.embeds.grad[vis.mask].abs().sum() > 0 and (vis.embeds.grad[~vis.mask] == 0).all()
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
    rows = [g for n, g in grads.items() if "embed_tokens.token_adapter" in n]  # (3, D): image, seg, rej
    assert len(rows) == 1 and rows[0][1].abs().sum() > 0  # the [SEG] row gets a gradient
    has_head_rows = any("lm_head.token_adapter" in n for n in grads)
    assert has_head_rows != arch.get("random_tie_embeddings", False)  # a tied head follows the embeddings
    assert all(grads[f"seg_mlp.{i}.weight"].abs().sum() > 0 for i in (0, 2))
    assert grads["reject_head.weight"].abs().sum() > 0
    base = [n for n, p in model.llm.named_parameters() if "base_layer" in n or n.endswith("norm.weight")]
    assert base and not any(dict(model.llm.named_parameters())[n].requires_grad for n in base)


def test_seg_and_rej_multi_and_no_target(tok_dir: str) -> None:
    model = _build(tok_dir)
    items = [(["a"], [1]), (["the blue star", "both squares"], [0, 3]), (["nothing"], [0])]
    ids, mask, labels = _batch(model, items)
    with torch.no_grad():
        out = model(ids, mask, _visual([2, 4, 3], model.hidden_size), labels, target_counts=[1, 3, 0])
    assert out.seg_valid.tolist() == [[True, False, False], [True, True, True], [False, False, False]]
    assert (out.seg_embeds[~out.seg_valid] == 0).all()
    assert (out.seg_embeds[out.seg_valid].abs().sum(-1) > 0).all()
    # no [SEG] anywhere in the batch → T = 0
    ids0, mask0, labels0 = _batch(model, [(["nothing"], [0])])
    with torch.no_grad():
        out0 = model(ids0, mask0, _visual([2], model.hidden_size), labels0, target_counts=[0])
    assert out0.seg_embeds.shape == (1, 0, 8) and out0.seg_valid.shape == (1, 0)
    assert out0.loss is not None and torch.isfinite(out0.loss)


def test_seg_count_mismatch_names_both_counts(tok_dir: str) -> None:
    model = _build(tok_dir)
    ids, mask, labels = _batch(model, [(["a"], [1]), (["b"], [3])])
    with pytest.raises(TokenCountError, match=r"^sample 1: \[SEG\] tokens: 3, target masks: 2$"):
        model(ids, mask, _visual([2, 2], model.hidden_size), labels, target_counts=[1, 2])


def test_wrong_image_token_count_names_both_counts(tok_dir: str) -> None:
    model = _build(tok_dir)
    ids, mask, labels = _batch(model, [(["a"], [1]), (["b"], [1])])
    vis = _visual([2, 2], model.hidden_size)
    image = model.token_ids.image
    no_image = ids.clone()
    no_image[no_image == image] = model.tokenizer.eos_token_id
    with pytest.raises(TokenCountError, match=r"^sample 0: <image> tokens: 0, images: 1$"):
        model(no_image, mask, vis, labels)
    two = ids.clone()
    two[1, 5] = image
    with pytest.raises(TokenCountError, match=r"^sample 1: <image> tokens: 2, images: 1$"):
        model(two, mask, vis, labels)
    with pytest.raises(TokenCountError, match="sequences: 2, images"):
        model(ids, mask, _visual([2], model.hidden_size), labels)


def test_variable_k_alone_equals_padded_batch(tok_dir: str) -> None:
    model = _build(tok_dir)
    _perturb_adapters(model)
    items = [(["the red circle on the far left"], [1]), (["b"], [2])]
    ids, mask, labels = _batch(model, items)
    vis = _visual([3, 7], model.hidden_size)
    with torch.no_grad():
        batch = model(ids, mask, vis, labels)
        for b in range(2):
            n = int(mask[b].sum())
            k = int(vis.mask[b].sum())
            alone_vis = VisualTokens(embeds=vis.embeds[b : b + 1, :k], mask=vis.mask[b : b + 1, :k])
            alone = model(ids[b : b + 1, :n], mask[b : b + 1, :n], alone_vis, labels[b : b + 1, :n])
            length = n - 1 + k
            torch.testing.assert_close(batch.logits[b, :length], alone.logits[0], atol=1e-5, rtol=1e-4)
            t = int(alone.seg_valid.sum())
            torch.testing.assert_close(batch.seg_embeds[b, :t], alone.seg_embeds[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.reject_logit[b], alone.reject_logit[0], atol=1e-5, rtol=1e-4)
        # left padding in the input gives the same result (padding is dropped before splicing)
        left_ids, left_mask, left_labels = (torch.flip(t, dims=[1]) for t in (ids, mask, labels))
        for b in range(2):  # un-reverse the real tokens: [pad ... tokens]
            n = int(mask[b].sum())
            left_ids[b, -n:], left_labels[b, -n:] = ids[b, :n], labels[b, :n]
        left = model(left_ids, left_mask, vis, left_labels)
    torch.testing.assert_close(left.seg_embeds, batch.seg_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left.loss, batch.loss, atol=1e-5, rtol=1e-4)


def test_answer_logits_only_gives_the_same_loss_and_gradients(tok_dir: str) -> None:
    """``answer_logits=True`` runs the LM head at the answer positions only: same loss, same grads."""
    model = _build(tok_dir).train()
    _perturb_adapters(model)
    ids, mask, labels = _batch(model, [(["the red circle on the far left"], [1]), (["b"], [2])])
    vis = _visual([3, 7], model.hidden_size)
    grads, losses = [], []
    for answer_logits in (False, True):
        model.zero_grad()
        out = model(ids, mask, vis, labels, answer_logits=answer_logits)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        losses.append(out.loss.detach())
    assert out.logits.shape == (int((labels[:, 1:] != -100).sum()), len(model.tokenizer))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_save_load_round_trip(tok_dir: str, tmp_path: Path, lora: bool) -> None:
    model = _build(tok_dir, lora=LoraSettings(enabled=lora, dropout=0.0))
    _perturb_adapters(model)
    ids, mask, labels = _batch(model, [(["a"], [1]), (["b c"], [2])])
    vis = _visual([3, 4], model.hidden_size)
    with torch.no_grad():
        ref = model(ids, mask, vis, labels)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "adapter").is_dir() == lora and (tmp_path / "m" / "llm").is_dir()
    loaded = GroundingMLLM.from_pretrained(tmp_path / "m")
    assert loaded.token_ids == model.token_ids
    assert not any(p.requires_grad for p in loaded.parameters())  # inference: all frozen
    resumed = GroundingMLLM.from_pretrained(tmp_path / "m", trainable=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == trained
    with torch.no_grad():
        out = loaded(ids, mask, vis, labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.seg_embeds, ref.seg_embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.reject_logit, ref.reject_logit, atol=1e-6, rtol=1e-6)


def test_merge_lora_preserves_outputs(tok_dir: str) -> None:
    model = _build(tok_dir)
    _perturb_adapters(model)
    ids, mask, labels = _batch(model, [(["a"], [2])])
    vis = _visual([3], model.hidden_size)
    with torch.no_grad():
        ref = model(ids, mask, vis, labels)
        model.merge_lora()
        out = model(ids, mask, vis, labels)
    assert not any("lora_" in n or "token_adapter" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.seg_embeds, ref.seg_embeds, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss(tok_dir: str) -> None:
    losses = []
    for checkpointing in (False, True):
        model = _build(tok_dir, gradient_checkpointing=checkpointing).train()
        ids, mask, labels = _batch(model, [(["a"], [1])])
        out = model(ids, mask, _visual([3], model.hidden_size), labels)
        (out.loss + out.seg_embeds.sum() + out.reject_logit.sum()).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        losses.append(out.loss.detach())
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.llm.modules())
    torch.testing.assert_close(losses[0], losses[1])


def test_generate_returns_text_and_the_training_seg_embeddings(tok_dir: str) -> None:
    model = _build(tok_dir, lora=LoraSettings(enabled=False)).train()
    items = [(["the red circle"], [1]), (["the two stars"], [2])]
    ids, mask, labels = _batch(model, items)
    vis = _visual([3, 5], model.hidden_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # memorise the two answers
        loss = model(ids, mask, vis, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompt_ids, prompt_mask, _ = _batch(model, [(["the red circle"], [None]), (["the two stars"], [None])])
    gen = model.generate(prompt_ids, prompt_mask, vis, max_new_tokens=16)
    assert gen.text == [answer_text(1), answer_text(2)]
    assert gen.seg_valid.tolist() == [[True, False], [True, True]]
    with torch.no_grad():
        teacher = model(ids, mask, vis, labels)
    # same states in training (teacher forcing) and generation: [SEG] consumed, last prompt token
    torch.testing.assert_close(gen.seg_embeds, teacher.seg_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gen.reject_logit, teacher.reject_logit, atol=1e-5, rtol=1e-4)
    alone = model.generate(prompt_ids[1:], prompt_mask[1:], VisualTokens(vis.embeds[1:], vis.mask[1:]))
    assert alone.text == gen.text[1:]
    torch.testing.assert_close(alone.seg_embeds[0], gen.seg_embeds[1], atol=1e-5, rtol=1e-4)
    # decoding that stops right after emitting [SEG] still runs the step that reads its state
    n = gen.sequences[0].tolist().index(model.token_ids.seg) + 1
    one = VisualTokens(vis.embeds[:1], vis.mask[:1])
    short = model.generate(prompt_ids[:1], prompt_mask[:1], one, max_new_tokens=n)
    assert short.sequences.shape == (1, n) and short.seg_valid.tolist() == [[True]]
    torch.testing.assert_close(short.seg_embeds, gen.seg_embeds[:1, :1], atol=1e-5, rtol=1e-4)


def test_word_states_are_the_prompt_tokens_in_training_and_generation(tok_dir: str, tmp_path: Path) -> None:
    model = _build(tok_dir, lora=LoraSettings(enabled=False), word_states=True)
    items = [(["the red circle"], [1]), (["the two big stars on the left"], [2])]
    ids, mask, labels = _batch(model, items)
    vis = _visual([3, 5], model.hidden_size)
    with torch.no_grad():
        teacher = model(ids, mask, vis, labels)
    prompt_ids, prompt_mask, _ = _batch(model, [(e, [None]) for e, _ in items])
    gen = model.generate(prompt_ids, prompt_mask, vis, max_new_tokens=4)
    assert teacher.word_states is not None and teacher.word_mask is not None and gen.word_mask is not None
    # one state per text token of the prompt (the <image> token became visual tokens): W = L_prompt - 1
    counts = (prompt_mask.sum(dim=1) - 1).tolist()
    assert teacher.word_mask.sum(dim=1).tolist() == counts == gen.word_mask.sum(dim=1).tolist()
    assert teacher.word_states.shape == (2, max(counts), model.seg_dim)
    # causal: the prompt's states do not depend on the answer after it, nor on the padding side
    torch.testing.assert_close(gen.word_states, teacher.word_states, atol=1e-5, rtol=1e-4)
    assert (teacher.word_states[~teacher.word_mask] == 0).all()
    # the word MLP is saved with the other heads
    model.save_pretrained(tmp_path / "m")
    back = GroundingMLLM.from_pretrained(tmp_path / "m")
    assert back.word_mlp is not None
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask, vis, labels).word_states, teacher.word_states)
    assert _build(tok_dir).word_mlp is None  # off by default: outputs carry None
    assert _build(tok_dir)(ids, mask, vis, labels).word_states is None


def test_llava_checkpoint_parts_match_transformers(tok_dir: str, tmp_path: Path) -> None:
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = CLIPVisionConfig(image_size=32, patch_size=8, **tiny)
    text = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **tiny)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    )
    llava.eval().save_pretrained(str(tmp_path / "llava"))
    tokenizer.save_pretrained(str(tmp_path / "llava"))

    parts = load_llava_checkpoint(tmp_path / "llava")
    assert parts.vision.grid == (4, 4) and parts.image_token_id == image_id and parts.tokenizer is not None
    assert sorted(parts.projector_state) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    projector = torch.nn.Module()
    projector.mlp = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    projector.load_state_dict(parts.projector_state)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(10, len(tokenizer), (2, 9))
    with torch.no_grad():
        ref = torch.stack(list(llava.model.get_image_features(pixel_values=pixels).pooler_output))
        torch.testing.assert_close(projector.mlp(parts.vision(pixels)), ref)  # layer -2, CLS dropped
        torch.testing.assert_close(parts.llm(input_ids=ids).logits, llava(input_ids=ids).logits)

    model = build_grounding_mllm(MLLMConfig(llava_path=str(tmp_path / "llava"), seg_dim=8)).eval()
    assert model.token_ids.image == image_id  # the folder's tokenizer already had <image>
    batch = _batch(model, [(["a"], [1])])
    with torch.no_grad():
        out = model(batch[0], batch[1], _visual([3], model.hidden_size), batch[2])
    assert out.seg_embeds.shape == (1, 1, 8)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name_or_path": "a", "llava_path": "b"}, "llava_path"),
        ({"quantization": "4bit"}, "quantization"),
        ({"name_or_path": "a", "quantization": "4bit", "lora": LoraSettings(enabled=False)}, "quantization"),
        ({"seg_dim": 0}, "seg_dim"),
        ({"random_hidden_size": 30, "random_num_heads": 4}, "random_hidden_size"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        MLLMConfig(**kwargs)


def test_heads_cast_to_bf16_still_run(tok_dir: str) -> None:
    """DeepSpeed's bf16 mode casts every module, the float32 heads included; the heads then read the
    LLM's states in their own dtype (no "mat1 and mat2 must have the same dtype")."""
    model = _build(tok_dir, pointer_dim=8, word_states=True)
    for head in model._heads().values():
        head.to(torch.bfloat16)
    ids, mask, labels = _batch(model, [(["a"], [1]), (["both squares"], [2])])
    with torch.no_grad():
        out = model(ids, mask, _visual([2, 4], model.hidden_size), labels, target_counts=[1, 2])
        gen = model.generate(ids[:1, :-4], mask[:1, :-4], _visual([2], model.hidden_size), max_new_tokens=3)
    assert out.seg_embeds.dtype == out.reject_logit.dtype == out.region_logits.dtype == torch.bfloat16
    assert out.region_logits.shape == (2, 2, 4) and torch.isfinite(out.region_logits).all()
    assert gen.reject_logit.dtype == torch.bfloat16
