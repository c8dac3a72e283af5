"""The region pointer in RISModel (mllm.pointer_dim): region logits from [SEG] states over the visual
tokens, the painted prior, the head as a residual on it, the region losses, generate, save / load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_model_kit import SIZE, TEMPLATE, synth_samples, tiny_cfg

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.losses import region_coverage
from mllm_ris.modeling.model import PRIOR_CLAMP, RISModel, build_model
from mllm_ris.modeling.model_build import build_parts
from mllm_ris.modeling.predictor import build_processor
from mllm_ris.modeling.projector import MASKED_LOGIT, descriptor_features, paint_regions

POINTER = "model.mllm.pointer_dim=16"


def _build(output_mode: str = "direct", *extra: str) -> RISModel:
    torch.manual_seed(0)
    return build_model(tiny_cfg("mllm", output_mode, POINTER, *extra))


def _batch(model: RISModel, answers: bool = True):
    return build_processor(model, image_size=SIZE, answers=answers, template=TEMPLATE)(synth_samples())


@pytest.mark.parametrize(("output_mode", "descriptors"), [("direct", True), ("auto", False)])
def test_pointer_prior_losses_and_gradients(output_mode: str, descriptors: bool) -> None:
    model = _build(output_mode, f"model.projector.descriptors={str(descriptors).lower()}").train()
    batch = _batch(model)
    assert (batch.regions is not None) == descriptors
    out = model(batch)
    k = int(model.projector.num_tokens(batch.superpixels).max())
    assert out.region_logits.shape == (3, 2, k) and out.prior.shape == (3, 2, SIZE, SIZE)
    assert {"region_bce", "region_dice"} <= set(out.loss_terms) and torch.isfinite(out.loss)
    # the prior is the region logits painted through the superpixels in token order, clamped
    labels = model.projector.region_labels(batch.superpixels)
    painted = paint_regions(out.region_logits, labels).clamp(-PRIOR_CLAMP, PRIOR_CLAMP)
    torch.testing.assert_close(out.prior, painted)
    assert (out.prior[labels[:, None].expand_as(out.prior) < 0] == -PRIOR_CLAMP).all()
    # padded regions never score
    real = model.projector.num_tokens(batch.superpixels)
    for b, n in enumerate(real.tolist()):
        assert (out.region_logits[b, :, n:] == MASKED_LOGIT).all()
    # the head refines the prior: head_up - prior is the head's own upsampled output
    if output_mode == "direct":
        assert not torch.equal(out.masks, out.prior)
    out.loss.backward()
    pointer = model.mllm.pointer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pointer.parameters())
    # the region losses reach the LLM through the [SEG] and visual-token states
    region_only = model(batch)
    model.zero_grad()
    (region_only.loss_terms["region_bce"]).backward()
    llm_grads = [p.grad for p in model.mllm.llm.parameters() if p.requires_grad and p.grad is not None]
    assert any(g.abs().sum() > 0 for g in llm_grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    if descriptors:  # the descriptor MLP is in the graph, regions numbered as the tokens
        assert all(p.grad is not None for p in model.projector.desc_mlp.parameters())
        assert batch.regions.shape.shape[:2] == out.region_logits.shape[::2]
        assert torch.equal(
            batch.regions.mask, model.projector.num_tokens(batch.superpixels)[:, None] > torch.arange(k)
        )


def test_region_coverage_counts_pixels() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, -1, -1], [2, 2, -1, -1]]])  # (1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # all of region 0
    target[0, 0, 0, 2] = 1  # a quarter of region 1
    target[0, 0, 3, 3] = 1  # a padding pixel: counts for no region
    cov = region_coverage(labels, target, 4)
    torch.testing.assert_close(cov, torch.tensor([[[1.0, 0.25, 0.0, 0.0]]]))


def test_pointer_generate_and_no_target_batch() -> None:
    model = _build("direct").eval()
    out = model.generate(_batch(model, answers=False), max_new_tokens=6)
    assert out.region_logits is not None and out.region_logits.shape[:2] == out.masks.shape[:2]
    neg = build_processor(model, image_size=SIZE)([synth_samples()[2]] * 2)
    model.train()
    out = model(neg)  # T = 0: no pair, the region terms are 0 and backward works
    assert out.region_logits.shape[1] == 0 and out.loss_terms["region_bce"] == 0
    out.loss.backward()


def test_pointer_save_load_round_trip(tmp_path: Path) -> None:
    model = _build("direct").eval()
    batch = _batch(model)
    with torch.no_grad():
        ref = model(batch)
    model.save_pretrained(tmp_path / "m")
    loaded = RISModel.from_pretrained(tmp_path / "m")
    assert loaded.mllm.pointer is not None
    with torch.no_grad():
        out = loaded(batch)
    torch.testing.assert_close(out.region_logits, ref.region_logits)
    torch.testing.assert_close(out.masks, ref.masks)


def test_pointer_needs_superpixel_tokens() -> None:
    with pytest.raises(ConfigError, match=r"mllm\.pointer_dim: the region pointer needs projector\.kind"):
        build_model(tiny_cfg("mllm", "direct", POINTER, "model.projector.kind=patch"))
    with pytest.raises(
        ConfigError, match=r"descriptors: need kind superpixel and max_tokens null \(descriptors"
    ):
        tiny_cfg("mllm", "direct", "model.projector.descriptors=true", "model.projector.max_tokens=4")


def test_pointer_learns_two_queries_of_one_image() -> None:
    """Overfit: two sentences about one image name different objects; after training, each [SEG]'s
    best region lies inside its own target (the pointer reads the sentence, not the saliency)."""
    from test_model_kit import BLUE, RED, scene

    shapes = [("disc", RED, 20, 22, 12), ("square", BLUE, 44, 44, 10)]
    samples = [
        scene(7, [(*s, i == t) for i, s in enumerate(shapes)], text)
        for t, text in ((0, "the red circle"), (1, "the blue square"))
    ]
    torch.manual_seed(0)
    model = build_model(
        tiny_cfg(
            "mllm", "direct", POINTER, "model.projector.descriptors=true", "model.mllm.lora.enabled=false"
        )
    ).train()
    batch = build_processor(model, image_size=SIZE, template=TEMPLATE)(samples)
    labels = model.projector.region_labels(batch.superpixels)
    coverage = region_coverage(labels, batch.target_masks, labels.max() + 1)[:, 0]  # (2, K)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    for _ in range(120):
        out = model(batch)
        best = out.region_logits[:, 0].argmax(-1)  # (2,) the chosen region per query
        if (coverage.gather(1, best[:, None]) >= 0.5).all() and out.loss_terms["lm"] < 0.1:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert (coverage.gather(1, best[:, None]) >= 0.5).all(), coverage.gather(1, best[:, None])
    assert best[0] != best[1]


def test_pointer_warmup_step_and_prior_output_mode() -> None:
    """segment=False trains the language side only (no head terms, the head gets no gradient); output mode
    prior returns the painted prior as the masks, in forward and generate."""
    model = _build("direct", "model.mllm.pointer_layers=1", "model.mllm.pointer_words=true").train()
    batch = _batch(model)
    out = model(batch, segment=False)
    assert not any(k.startswith("head") for k in out.loss_terms)
    assert {"lm", "no_target", "region_bce", "region_dice"} <= set(out.loss_terms)
    _check_prior_masks(out, model.projector.region_labels(batch.superpixels))
    out.loss.backward()
    assert all(p.grad is None for p in model.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mllm.pointer.mix.parameters())
    prior_model = _build("prior").eval()
    assert prior_model.sam_stage is None
    gen_batch = _batch(prior_model, answers=False)
    gen = prior_model.generate(gen_batch, max_new_tokens=6)
    _check_prior_masks(gen, prior_model.projector.region_labels(gen_batch.superpixels))
    assert ((gen.scores >= 0) & (gen.scores <= 1)).all()
    with pytest.raises(ConfigError, match="needs the region pointer"):
        build_model(tiny_cfg("mllm", "direct")).train()(batch, segment=False)
    assert model.mllm.pointer.word_proj.weight.grad.abs().sum() > 0  # the words reach the pointer
    with pytest.raises(ConfigError, match="pointer_words: needs pointer_layers > 0"):
        tiny_cfg("mllm", "direct", POINTER, "model.mllm.pointer_words=true")
    with pytest.raises(ConfigError, match="pointer_layers: needs pointer_dim set"):
        tiny_cfg("mllm", "direct", "model.mllm.pointer_layers=1")


def test_collator_memoises_descriptors_per_canvas(monkeypatch: pytest.MonkeyPatch) -> None:
    """A canvas seen again reuses its descriptors (same values, no recomputation); the memo is bounded."""
    import mllm_ris.processing.processor as mc

    model = _build("direct", "model.projector.descriptors=true")
    collate = build_processor(model, image_size=SIZE, template=TEMPLATE)
    first = collate(synth_samples())
    calls: list[int] = []
    original = mc.region_descriptors
    monkeypatch.setattr(mc, "region_descriptors", lambda *a: calls.append(1) or original(*a))
    again = collate(synth_samples())
    assert calls == [] and torch.equal(first.regions.shape, again.regions.shape)
    assert torch.equal(first.regions.color, again.regions.color)
    collate._memo.capacity = 1  # DESCRIPTOR_MEMO = 1
    collate._memo.clear()
    collate(synth_samples())
    assert len(collate._memo) == 1 and len(calls) == len({s.image_id for s in synth_samples()})


def test_pointer_regions_tokens_scores_the_visual_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """mllm.pointer_regions=tokens: the pointer's region states are the visual tokens the LLM received."""
    model = _build("direct", "model.mllm.pointer_regions=tokens").eval()
    batch = _batch(model)
    seen: list[torch.Tensor] = []
    original = model.mllm.pointer.forward
    monkeypatch.setattr(model.mllm.pointer, "forward", lambda q, r, *a: seen.append(r) or original(q, r, *a))
    with torch.no_grad():
        model(batch, segment=False)
        tokens = model.visual_tokens(batch).embeds
    torch.testing.assert_close(seen[0], tokens)
    with pytest.raises(ConfigError, match=r"pointer_regions: must be one of \['llm', 'tokens'\]"):
        tiny_cfg("mllm", "direct", POINTER, "model.mllm.pointer_regions=pixels")


@pytest.mark.parametrize("encoder", ["mlp", "conv", "image"])
def test_tokens_from_descriptors_alone_build_and_run_no_tower(encoder: str) -> None:
    """projector.tower false: no vision tower is built or run, every visual token is the region encoder's
    embedding of its descriptors (an MLP, or a shape CNN + MLP), plus with ``image_encoder: cnn`` the
    image CNN's features pooled per region, and the model trains as usual."""
    extra = ("model.projector.descriptors=true", "model.projector.tower=false")
    if encoder == "image":
        extra += ("model.projector.image_encoder=cnn",)
    else:
        extra += (f"model.projector.descriptor_encoder={encoder}",)
    model = _build("prior", *extra).train()
    assert hasattr(model.projector.desc_mlp, "conv") == (encoder == "conv")
    assert (model.projector.image_cnn is not None) == (encoder == "image")
    assert model.vision is None and model.projector.attn is None and model.projector.pos_mlp is None
    assert not hasattr(model.projector, "mlp")
    batch = _batch(model)
    vis = model.visual_tokens(batch)
    k = int(model.projector.num_tokens(batch.superpixels).max())
    assert vis.embeds.shape == (3, k, model.mllm.hidden_size)
    expected = model.projector.desc_mlp(descriptor_features(batch.regions, k, torch.float32))
    if encoder == "image":
        labels = model.projector.region_labels(batch.superpixels)  # (B, S, S) token order
        expected = expected + model.projector.image_cnn(batch.images, labels, k)
    torch.testing.assert_close(vis.embeds, expected * vis.mask[..., None])
    out = model(batch, segment=False)  # the language side trains through the region encoder
    out.loss.backward()
    assert all(p.grad is not None for p in model.projector.desc_mlp.parameters())
    if encoder == "image":
        assert all(p.grad is not None for p in model.projector.image_cnn.parameters())


def test_tower_off_needs_descriptors_and_round_trips(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tower: false builds tokens from the descriptors alone"):
        tiny_cfg("mllm", "direct", "model.projector.tower=false")
    with pytest.raises(ConfigError, match=r"descriptor_encoder: must be one of"):
        tiny_cfg("mllm", "direct", "model.projector.descriptor_encoder=gnn")
    extra = ("model.projector.descriptors=true", "model.projector.tower=false")
    model = _build("prior", *extra, "model.projector.descriptor_encoder=conv").eval()
    model.save_pretrained(tmp_path / "m")
    loaded = RISModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.vision is None and not (tmp_path / "m" / "vision.safetensors").exists()
    batch = _batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).region_logits, model(batch).region_logits)


@pytest.mark.parametrize("detach", [False, True])
def test_reject_detach_keeps_the_no_target_loss_out_of_the_llm(detach: bool) -> None:
    """mllm.reject_detach: the no-target loss trains the reject head and nothing under it; the reject
    logits (training and generation) are the same numbers either way."""
    model = _build("prior", f"model.mllm.reject_detach={str(detach).lower()}").train()
    batch = _batch(model)
    out = model(batch, segment=False)
    out.loss_terms["no_target"].backward()
    head = [p.grad for p in model.mllm.reject_head.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head)
    llm = [p.grad for p in model.mllm.llm.parameters() if p.requires_grad]
    reached = any(g is not None and g.abs().sum() > 0 for g in llm)
    assert reached != detach
    with torch.no_grad():
        gen = model.generate(_batch(model, answers=False), max_new_tokens=4)
    assert gen.no_target_prob.shape == (3,) and torch.isfinite(gen.no_target_prob).all()


def test_prior_mode_builds_no_pixel_side_and_old_folders_still_load(tmp_path: Path) -> None:
    """Output mode prior builds no pixel encoder / head / SAM and its folder has no files for them; a
    folder written before (with pixel_encoder / head files, as bundled models had) loads the same
    model, the extra files ignored."""
    from safetensors.torch import save_file

    from mllm_ris.inference.pipeline import default_model_path
    from mllm_ris.modeling.model_io import check_model_folder

    model = _build("prior").eval()
    assert model.pixel_encoder is None and model.head is None and model.sam_stage is None
    folder = model.save_pretrained(tmp_path / "m")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "projector.safetensors", "mllm"} <= files
    assert not files & {"pixel_encoder.safetensors", "head.safetensors", "sam_stage.safetensors"}
    check_model_folder(folder)  # a RISModel folder without head.safetensors
    batch = _batch(model, answers=False)
    with torch.no_grad():
        a = model.generate(batch, max_new_tokens=6)
        b = RISModel.from_pretrained(folder).generate(batch, max_new_tokens=6)
    assert a.text == b.text
    for name in ("masks", "scores", "no_target_prob"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), msg=name)
    # the layout of older prior-mode folders: pixel side files beside the rest
    old = _build("direct")
    for part in ("pixel_encoder", "head"):
        save_file(
            {k: v.contiguous() for k, v in getattr(old, part).state_dict().items()},
            str(folder / f"{part}.safetensors"),
        )
    loaded = RISModel.from_pretrained(folder)
    assert loaded.head is None and loaded.pixel_encoder is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.generate(batch, max_new_tokens=6).masks, a.masks)
    # the bundled model is a prior-mode folder of the new layout
    bundled = default_model_path()
    assert (
        not (bundled / "head.safetensors").exists() and not (bundled / "pixel_encoder.safetensors").exists()
    )
    assert RISModel.from_pretrained(bundled).head is None
    parts = build_parts(tiny_cfg("mllm", "direct", POINTER)).kwargs
    with pytest.raises(ConfigError, match="prior has no pixel side"):
        RISModel(**{**parts, "cfg": model.cfg})  # a prior-mode model given a pixel side
    with pytest.raises(ConfigError, match="prior has no pixel side"):
        RISModel(**{**parts, "pixel_encoder": None, "head": None})  # a direct-mode model without one


def _check_prior_masks(out, labels: torch.Tensor) -> None:
    """Prior-mode masks: the painted region logits, each query's shifted up just enough that its best
    region is painted (> 0): a [SEG] always points at a region; a confident query's masks are its prior."""
    logits = out.region_logits  # (B, T, K)
    best = logits.argmax(-1)  # (B, T)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if logits[b, t].max() <= MASKED_LOGIT:  # a padded query slot
                continue
            region = labels[b] == best[b, t]
            assert (out.masks[b, t][region] > 0).all()
            if logits[b, t].max() >= 0.01:
                torch.testing.assert_close(out.masks[b, t], out.prior[b, t])
            else:  # shifted up (never down) where a region is; no region's pixels stay at the floor
                diff = (out.masks[b, t] - out.prior[b, t])[labels[b] >= 0]
                assert diff.min() >= -1e-5 and diff.max() > 0
                assert (out.masks[b, t][labels[b] < 0] == -PRIOR_CLAMP).all()


REJECT_POINTER = ("model.mllm.reject_from=pointer", "model.projector.descriptors=true")


def test_reject_from_pointer_scores_the_prompt_state_against_the_regions() -> None:
    """mllm.reject_from pointer: the reject logit is minus the best region logit of the prompt-end query;
    the presence terms train it on the union of the targets (all regions negative for a no-target
    sample), their gradient reaches the pointer and the LLM, and the unused reject head gets none."""
    model = _build("prior", *REJECT_POINTER).train()
    batch = _batch(model)
    out = model(batch, segment=False)
    k = out.region_logits.shape[-1]
    assert {"presence_region_bce", "presence_region_dice", "no_target"} <= set(out.loss_terms)
    assert all(torch.isfinite(v) for v in out.loss_terms.values())
    gen_out = model.mllm(
        batch.input_ids, batch.attention_mask, model.visual_tokens(batch), batch.labels
    )  # the GroundingMLLM output behind `out`
    assert gen_out.presence_logits.shape == (3, 1, k)
    torch.testing.assert_close(gen_out.reject_logit, -gen_out.presence_logits[:, 0].amax(-1))
    torch.testing.assert_close(out.no_target_prob, torch.sigmoid(gen_out.reject_logit))
    (out.loss_terms["presence_region_bce"] + out.loss_terms["no_target"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mllm.pointer.parameters())
    llm = [p.grad for p in model.mllm.llm.parameters() if p.requires_grad and p.grad is not None]
    assert any(g.abs().sum() > 0 for g in llm)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.mllm.reject_head.parameters())
    # generation: the pointer decides both ways (reject_threshold 0.5): a row is rejected (no [SEG]
    # kept, the rejection answer) exactly when its best presence logit is not above 0, and a row the
    # LLM answered without [SEG] gets one query, the presence query's, when a region is found
    model.eval()
    with torch.no_grad():
        gen = model.generate(_batch(model, answers=False), max_new_tokens=6)
        absent = model.generate(_batch(model, answers=False), max_new_tokens=0)  # no [SEG] generated
    for out in (gen, absent):
        for b in range(3):
            rejected = bool(out.no_target_prob[b] > 0.5)
            assert rejected == (not out.target_valid[b].any()) == model.rejected(out.text[b])
    with pytest.raises(ConfigError, match="reject_from: pointer needs the region pointer"):
        tiny_cfg("mllm", "direct", "model.mllm.reject_from=pointer")
    with pytest.raises(ConfigError, match=r"reject_from: must be one of \['head', 'pointer'\]"):
        tiny_cfg("mllm", "direct", POINTER, "model.mllm.reject_from=lm")


def test_reject_from_pointer_learns_present_from_absent_on_one_image() -> None:
    """Overfit: one image, a sentence naming a present object and one naming an absent one of the same
    form; after training through the presence query alone (the reject head is unused) the present one
    is answered and the absent one rejected."""
    from test_model_kit import BLUE, RED, scene

    shapes = [("disc", RED, 20, 22, 12), ("square", BLUE, 44, 44, 10)]
    samples = [
        scene(7, [(*s, i == 0) for i, s in enumerate(shapes)], "the red circle"),
        scene(7, [(*s, False) for s in shapes], "the red square"),
    ]
    torch.manual_seed(0)
    model = build_model(
        tiny_cfg("mllm", "prior", POINTER, *REJECT_POINTER, "model.mllm.lora.enabled=false")
    ).train()
    batch = build_processor(model, image_size=SIZE, template=TEMPLATE)(samples)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    for _ in range(150):
        out = model(batch, segment=False)
        if out.no_target_prob[0] < 0.2 and out.no_target_prob[1] > 0.8:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.no_target_prob[0] < 0.5 < out.no_target_prob[1], out.no_target_prob
    # generation with no answer tokens (the LLM says nothing, so no [SEG]): the pointer answers the
    # present sentence with one query, the presence query, whose best region lies in the target, and
    # rejects the absent one
    model.eval()
    prompts = build_processor(model, image_size=SIZE, answers=False, template=TEMPLATE)(samples)
    with torch.no_grad():
        gen = model.generate(prompts, max_new_tokens=0)
        presence = model.mllm.generate(
            prompts.input_ids, prompts.attention_mask, model.visual_tokens(prompts), max_new_tokens=0
        ).presence_logits  # (2, 1, K)
    assert gen.text[0] == "Sure, it is [SEG]." and model.rejected(gen.text[1])
    assert gen.target_valid.tolist() == [[True], [False]]
    torch.testing.assert_close(gen.region_logits[0, 0], presence[0, 0])
    labels = model.projector.region_labels(prompts.superpixels)
    coverage = region_coverage(labels[:1], batch.target_masks[:1], labels.max() + 1)[0, 0]  # (K,)
    assert coverage[presence[0, 0].argmax()] >= 0.5


def _four_apart() -> torch.Tensor:
    """A 5 x 5 label map of four regions (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)
    that do not touch: row 2 and column 2 are ``-1``."""
    labels = torch.full((5, 5), -1, dtype=torch.long)
    labels[:2, :2], labels[:2, 3:], labels[3:, :2], labels[3:, 3:] = 0, 1, 2, 3
    return labels


def test_distinct_regions_gives_each_seg_its_own_object_and_drops_repeats() -> None:
    """A group answer: each [SEG] gets a seed region of its own (greedy by logit); one whose best free
    region scores <= 0 repeats another's object and is dropped; a region two kept [SEG]s select goes
    to the one scoring it higher."""
    from mllm_ris.modeling.model_build import _distinct_regions

    real = torch.tensor([True, True, True, True, False])
    # both [SEG]s point at region 0 (the second higher) and the first also likes region 1
    logits = torch.tensor([[4.0, 3.0, -2.0, -5.0, 9.0], [6.0, 1.0, -3.0, -5.0, 9.0]])
    out = _distinct_regions(logits, real)
    assert [i for i, _ in out] == [0, 1]
    assert out[0][1].tolist() == [False, True, False, False, False]  # 1: its seed
    assert out[1][1].tolist() == [True, False, False, False, False]  # 0: the higher score
    # a repeat: the second [SEG]'s best free region is not above 0
    repeat = torch.tensor([[5.0, -1.0, -2.0, -2.0, 0.0], [4.0, -0.5, -2.0, -2.0, 0.0]])
    out = _distinct_regions(repeat, real)
    assert [i for i, _ in out] == [0] and out[0][1].tolist() == [True, False, False, False, False]
    # the best pair stays even when nothing is above 0 (a [SEG] points at one region at least)
    out = _distinct_regions(torch.full((2, 5), -3.0), real)
    assert len(out) == 1 and int(out[0][1].sum()) == 1


def test_connected_regions_groups_touching_regions() -> None:
    from mllm_ris.modeling.model_build import _connected_regions

    labels = _four_apart()
    labels[2, :2] = 0  # region 0 now touches region 2 (rows 1 / 3 through row 2)
    chosen = torch.tensor([True, True, True, False])
    groups = [g.nonzero()[:, 0].tolist() for g in _connected_regions(chosen, labels)]
    assert groups == [[0, 2], [1]]
    assert _connected_regions(torch.zeros(4, dtype=torch.bool), labels) == []


def test_complete_groups_drops_repeats_and_adds_what_the_presence_query_finds() -> None:
    """mllm.complete_groups: row 0 names region 0 twice and misses regions 2 and 3, which the presence
    query selects -> the repeat is dropped and two queries are added (the text says three); row 1 (one
    [SEG]) and row 2 (a right pair) keep their queries and text."""
    from mllm_ris.modeling.model_build import GroupAnswer, _complete_groups, group_queries
    from mllm_ris.processing.processor import answer_text

    labels = _four_apart()[None].expand(3, 5, 5)
    seg = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2)
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    logits = torch.tensor(
        [
            [[5.0, -3.0, -3.0, -3.0], [4.0, -2.0, -3.0, -3.0]],
            [[5.0, -3.0, -3.0, -3.0], [0.0, 0.0, 0.0, 0.0]],
            [[5.0, -1.0, -3.0, -3.0], [-1.0, 5.0, -3.0, -3.0]],
        ]
    )
    presence = torch.tensor([[[3.0, -1.0, 2.0, 2.5]], [[3.0, -1.0, -1.0, -1.0]], [[3.0, 3.0, -1.0, -1.0]]])
    embed = torch.full((3, 2), -7.0)
    text = [answer_text(2), answer_text(1), answer_text(2)]
    out = _complete_groups(
        GroupAnswer(seg, valid, logits, text), presence, embed, labels, torch.ones(3, 4, dtype=torch.bool)
    )
    assert out.text == [answer_text(3), answer_text(1), answer_text(2)]
    assert out.seg_valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    chosen = out.region_logits > 0  # (3, 3, 4)
    assert chosen[0].tolist() == [
        [True, False, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]
    torch.testing.assert_close(out.seg[0, 0], seg[0, 0])
    torch.testing.assert_close(out.seg[0, 1:], embed[0].expand(2, 2))  # the presence query's embedding
    assert out.region_logits[0, 2, 3] == 2.5  # the presence logits on its group
    # the added group queries are marked: a refining head leaves their prior alone
    assert out.added is not None
    assert out.added.tolist() == [[False, True, True], [False, False, False], [False, False, False]]
    # and every query of a group answer keeps its prior (LLMQueries.decode's Queries.prior_only)
    groups = group_queries(out.seg_valid).tolist()
    assert groups == [[True, True, True], [False, False, False], [True, True, False]]
    torch.testing.assert_close(out.region_logits[1, 0], logits[1, 0])
    assert chosen[2, :2].tolist() == [[True, False, False, False], [False, True, False, False]]


def test_a_refining_head_reads_the_prior_and_leaves_prior_only_queries_alone() -> None:
    """``head.prior_input``: at initialisation the refined mask is the mask output mode prior shows
    (each query's best region at least); once the residual moves, queries marked ``prior_only`` (the
    group queries ``complete_groups`` adds) keep their prior exactly, the others change."""
    torch.manual_seed(0)
    model = _build("direct", "model.head.prior_input=true").eval()
    batch = _batch(model)
    with torch.no_grad():
        out = model(batch)
        q = model.queries.teacher_forced(batch)
        shown = model.queries.prior_masks(q)  # (B, T, S, S)
        torch.testing.assert_close(out.masks, shown)
        model.head.prior_scale.fill_(1.0)
        real = q.lang.query_mask.nonzero().tolist()  # [(b, t), ...] the real query slots
        assert len(real) >= 2
        only = torch.zeros(shown.shape[:2], dtype=torch.bool)
        only[tuple(real[0])] = True
        seg = model._segment(batch.images, q.lang, shown, only)
    torch.testing.assert_close(seg.head_up[tuple(real[0])], shown[tuple(real[0])])
    assert (seg.head_up[tuple(real[1])] - shown[tuple(real[1])]).abs().amax() > 1e-4


def test_prior_gain_scales_the_prior_a_refiner_reads_and_adds_to() -> None:
    """``model.prior_gain``: with the residual at 0 the refined logits are ``gain * prior`` (the same
    mask, softer logits a residual can move)."""
    torch.manual_seed(0)
    model = _build("direct", "model.head.prior_input=true", "model.prior_gain=0.1").eval()
    batch = _batch(model)
    with torch.no_grad():
        q = model.queries.teacher_forced(batch)
        shown = model.queries.prior_masks(q)
        seg = model._segment(batch.images, q.lang, shown)
    torch.testing.assert_close(seg.head_up, 0.1 * shown)
    with pytest.raises(ConfigError, match="prior_gain: must be > 0"):
        tiny_cfg("mllm", "direct", POINTER, "model.prior_gain=0")
