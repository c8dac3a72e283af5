"""RISModel end to end on tiny parts: every mode x output mode, gradients, multi / no target, count errors,
target matching, auto choice, save -> from_pretrained, the predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_model_kit import SIZE, TEMPLATE, synth_samples, tiny_cfg

from mllm_ris.errors import CheckpointError
from mllm_ris.eval.evaluate import Predictor
from mllm_ris.modeling.llm import TokenCountError
from mllm_ris.modeling.losses import match_targets
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.predictor import RISPredictor, build_processor

MODES = [(m, o) for m in ("classic", "mllm") for o in ("direct", "sam", "auto")]


def _build(mode: str, output_mode: str, *extra: str, seed: int = 0) -> RISModel:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(mode, output_mode, *extra))


def _batch(model: RISModel, answers: bool = True):
    return build_processor(model, image_size=SIZE, answers=answers, template=TEMPLATE)(synth_samples())


def _frozen_groups(model: RISModel) -> dict[str, list[torch.nn.Parameter]]:
    groups = {}
    if model.vision is not None:
        groups["vision"] = list(model.vision.parameters())
    if model.mllm is not None:
        llm = model.mllm.llm
        groups["llm base"] = [
            p for n, p in llm.named_parameters() if "lora_" not in n and "trainable_tokens" not in n
        ]
    if model.sam_stage is not None:
        groups["sam vit"] = list(model.sam_stage.sam.image_encoder.parameters())
        groups["sam prompt encoder"] = list(model.sam_stage.sam.prompt_encoder.parameters())
    if model.text_encoder is not None:
        groups["text transformer"] = list(model.text_encoder.model.parameters())
    return groups


def _trained_groups(model: RISModel) -> dict[str, list[torch.nn.Parameter]]:
    groups = {"head": list(model.head.parameters()), "pixel encoder": list(model.pixel_encoder.parameters())}
    if model.mllm is not None:
        groups["projector"] = list(model.projector.parameters())
        groups["lora"] = [p for n, p in model.mllm.llm.named_parameters() if "lora_" in n]
        groups["token rows"] = [p for n, p in model.mllm.llm.named_parameters() if "trainable_tokens" in n]
        groups["grounding mlp"] = list(model.mllm.seg_mlp.parameters())
        groups["reject head"] = list(model.mllm.reject_head.parameters())
    if model.sam_stage is not None:
        groups["sam decoder"] = list(model.sam_stage.sam.mask_decoder.parameters())
        groups["sparse prompt"] = list(model.prompt_builder.parameters())
    if model.text_encoder is not None:
        groups["text projections"] = [
            *model.text_encoder.token_proj.parameters(),
            *model.text_encoder.pool_proj.parameters(),
        ]
    return groups


@pytest.mark.parametrize(("mode", "output_mode"), MODES)
def test_forward_backward_every_mode(mode: str, output_mode: str) -> None:
    model = _build(mode, output_mode).train()
    batch = _batch(model)
    out = model(batch)
    t = 1 if mode == "classic" else 2
    assert out.masks.shape == (3, t, SIZE, SIZE) and out.scores.shape == (3, t)
    assert out.mask_logits.shape == (3, t, SIZE // 4, SIZE // 4) and out.iou_pred.shape == (3, t)
    assert out.no_target_prob.shape == (3,) and out.text is None
    expect = {"head_bce", "head_dice", "iou"}
    if mode == "mllm":
        expect |= {"lm", "no_target"}
        assert out.target_valid.tolist() == [[True, False], [True, True], [False, False]]
    else:
        assert out.target_valid.all()
    if output_mode != "direct":
        expect |= {"sam_bce", "sam_dice", "sam_iou"}
        assert out.sam_logits.shape == (3, t, SIZE, SIZE) and out.from_sam.shape == (3, t)
    else:
        assert out.sam_logits is None and out.from_sam is None
    assert set(out.loss_terms) == expect and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, sum(out.loss_terms.values()))
    out.loss.backward()
    for name, params in _trained_groups(model).items():
        assert params and all(p.requires_grad and p.grad is not None for p in params), name
        assert any(p.grad.abs().sum() > 0 for p in params), f"{name}: all-zero gradients"
    for name, params in _frozen_groups(model).items():
        assert params and all(not p.requires_grad and p.grad is None for p in params), name


def test_output_modes_pick_masks() -> None:
    model = _build("mllm", "auto").eval()
    batch = _batch(model)
    with torch.no_grad():
        out = model(batch)
    pick = out.from_sam[..., None, None]
    head_up = torch.nn.functional.interpolate(out.mask_logits, (SIZE, SIZE), mode="bilinear")
    assert torch.equal(out.from_sam, out.sam_iou_pred > out.iou_pred)
    assert torch.equal(out.masks, torch.where(pick, out.sam_logits, head_up))
    assert torch.equal(out.scores, torch.maximum(out.sam_iou_pred, out.iou_pred))
    model.cfg.output_mode = "sam"
    with torch.no_grad():
        sam = model(batch)
    assert torch.equal(sam.masks, out.sam_logits) and sam.from_sam.all()


def test_multi_and_no_target_batch() -> None:
    """[SEG] embeddings follow the target masks; a [REJ] sample has no query and trains the reject head."""
    model = _build("mllm", "sam").train()
    batch = _batch(model)
    assert batch.target_counts.tolist() == [1, 2, 0]
    out = model(batch)
    assert out.matched_targets.shape == (3, 2, SIZE, SIZE)
    # matching only permutes a sample's own targets
    assert torch.equal(out.matched_targets.sum(1), batch.target_masks.sum(1))
    torch.autograd.backward(out.loss_terms["no_target"])
    assert model.mllm.reject_head.weight.grad.abs().sum() > 0
    # a batch of no-target samples only: no query slot at all, the mask terms are 0 and backward works
    neg = build_processor(model, image_size=SIZE)([synth_samples()[2]] * 2)
    out = model(neg)
    assert out.masks.shape == (2, 0, SIZE, SIZE) and out.loss_terms["head_bce"] == 0
    assert out.loss_terms["sam_dice"] == 0 and out.loss_terms["no_target"] > 0
    out.loss.backward()


def test_reject_threshold_turns_a_seg_answer_into_rej() -> None:
    """The reject head's probability above ``reject_threshold`` gives the [REJ] answer and no mask;
    ``null`` leaves the LLM's text alone; the loss weights the no-target class."""
    from mllm_ris.modeling.losses import no_target_loss
    from mllm_ris.processing.processor import answer_text

    model = _build("mllm", "direct").eval()
    prompts = _batch(model, answers=False)
    with torch.no_grad():
        model.mllm.reject_head.bias.fill_(-20.0)  # probability ~0: the LLM's own text stands
        free = model.generate(prompts, max_new_tokens=8)
        model.mllm.reject_head.bias.fill_(20.0)  # probability ~1 for every sample
        model.cfg.reject_threshold = None
        off = model.generate(prompts, max_new_tokens=8)
        model.cfg.reject_threshold = 0.5
        on = model.generate(prompts, max_new_tokens=8)
    assert off.text == free.text and torch.equal(off.target_valid, free.target_valid)
    assert on.text == [answer_text(0)] * 3 and not on.target_valid.any()
    pred = RISPredictor(model, image_size=SIZE).predict(synth_samples())
    assert [p.masks.shape[0] for p in pred] == [0, 0, 0] and all(p.no_target_prob > 0.99 for p in pred)
    logit, has = torch.zeros(4), torch.tensor([True, True, True, False])
    plain, weighted = no_target_loss(logit, has, 1.0), no_target_loss(logit, has, 1.0, pos_weight=3.0)
    torch.testing.assert_close(weighted, plain * 6 / 4)  # ln 2 per sample, the one negative x 3


def test_seg_count_mismatch_names_both_counts() -> None:
    model = _build("mllm", "direct")
    batch = _batch(model)
    batch.target_valid[0, 1] = True  # sample 0 says "it is [SEG]" once but now has 2 target masks
    with pytest.raises(TokenCountError, match=r"^sample 0: \[SEG\] tokens: 1, target masks: 2$"):
        model(batch)
    with pytest.raises(ValueError, match="answered chats"):
        model(_batch(model, answers=False))


def test_match_targets_undoes_a_swap() -> None:
    """Queries that predict the targets in the other order are matched to them by Hungarian assignment."""
    targets = torch.zeros(1, 3, 32, 32)
    targets[0, 0, :8, :8] = targets[0, 1, 20:, 20:] = targets[0, 2, :8, 24:] = 1
    logits = (targets[:, [2, 0, 1]] * 2 - 1)[..., ::4, ::4] * 5  # query t predicts target (t + 2) % 3
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    order = match_targets(logits, targets, torch.ones(1, 3, dtype=torch.bool), valid)
    assert order.tolist() == [[2, 0, 1]]
    assert match_targets(logits, targets, torch.tensor([[True, False, False]]), valid).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize(("mode", "output_mode"), [("classic", "auto"), ("mllm", "auto")])
def test_save_and_from_pretrained_give_identical_outputs(mode: str, output_mode: str, tmp_path: Path) -> None:
    model = _build(mode, output_mode, seed=3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = _batch(model)
    model.train()(batch).loss.backward()
    opt.step()  # weights away from their initial values (LoRA B starts at zero)
    model.eval()
    folder = model.save_pretrained(tmp_path / "m")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "head.safetensors", "pixel_encoder.safetensors", "sam_stage.safetensors"} <= files
    if mode == "mllm":
        assert {"vision.safetensors", "projector.safetensors", "mllm"} <= files
        assert (folder / "mllm" / "adapter").is_dir()
    torch.manual_seed(99)
    loaded = RISModel.from_pretrained(folder, device="cpu")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for name in ("loss", "masks", "mask_logits", "iou_pred", "sam_logits", "sam_iou_pred", "no_target_prob"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5, msg=name)
    if mode == "mllm":  # resuming: the LoRA adapters and the heads train again, the LLM base does not
        resumed = RISModel.from_pretrained(folder, trainable=True)
        names = {n for n, p in resumed.named_parameters() if p.requires_grad}
        assert any("lora_" in n for n in names) and "mllm.seg_mlp.0.weight" in names
        assert not any(n.startswith("vision.") for n in names)
    (folder / "head.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"head\.safetensors' is missing"):
        RISModel.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a RISModel folder"):
        RISModel.from_pretrained(tmp_path)


def test_predictor_classic_returns_original_sizes() -> None:
    model = _build("classic", "direct")
    predictor = RISPredictor(model, image_size=SIZE, batch_size=2)
    assert isinstance(predictor, Predictor)
    samples = synth_samples()
    preds = predictor.predict(samples)
    for pred, sample in zip(preds, samples, strict=True):
        h, w = sample.image.shape[:2]
        assert (
            pred.masks.dtype == np.bool_ and pred.masks.shape[1:] == (h, w) and pred.masks.shape[0] in (0, 1)
        )
        assert (pred.masks.shape[0] == 0) == (pred.no_target_prob > 0.5) and pred.text is None
    assert [m.shape for m in predictor.predict_batch(samples)] == [p.masks.shape for p in preds]


def test_each_config_is_saved_once_and_old_folders_load(tmp_path: Path) -> None:
    """The grounding LLM's config lives in config.json (model.mllm) only; a folder written before
    (mllm/mllm_config.json beside it, like the bundled model's) still loads, and re-saving over it
    drops the second copy. The derived widths are written resolved and checked on load."""
    import dataclasses
    import json

    from mllm_ris.errors import ConfigError
    from mllm_ris.inference.scenes import ASSETS_DIR
    from mllm_ris.modeling.mllm import GroundingMLLM

    model = _build("mllm", "auto", seed=4).eval()
    folder = model.save_pretrained(tmp_path / "m")
    tree = json.loads((folder / "config.json").read_text())
    assert not (folder / "mllm" / "mllm_config.json").exists()  # once: config.json's model.mllm
    assert tree["model"]["mllm"] == dataclasses.asdict(model.cfg.mllm)
    assert tree["model"]["head"]["lang_dim"] == model.mllm.seg_dim  # derived widths: written resolved
    assert tree["model"]["prompts"]["grounding_dim"] == model.mllm.seg_dim
    batch = _batch(model)
    with torch.no_grad():
        want = model(batch).masks
    loaded = RISModel.from_pretrained(folder)
    assert loaded.mllm.cfg == loaded.cfg.mllm == model.cfg.mllm
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).masks, want)
    with pytest.raises(CheckpointError, match=r"no mllm_config\.json"):  # a standalone GroundingMLLM folder
        GroundingMLLM.from_pretrained(folder / "mllm")

    # the layout before: mllm/mllm_config.json too (equal to model.mllm): loads as before
    (folder / "mllm" / "mllm_config.json").write_text(json.dumps(tree["model"]["mllm"]))
    with torch.no_grad():
        torch.testing.assert_close(RISModel.from_pretrained(folder)(batch).masks, want)
    model.save_pretrained(folder)  # re-saved: one copy again
    assert not (folder / "mllm" / "mllm_config.json").exists()

    # a derived width in config.json that the rebuilt parts disagree with: one line naming the field
    tree["model"]["head"]["in_channels"] = [1, 2, 3, 4]
    (folder / "config.json").write_text(json.dumps(tree))
    with pytest.raises(ConfigError, match=r"^head\.in_channels: \[1, 2, 3, 4\] disagrees with the pixel"):
        RISModel.from_pretrained(folder)

    # the bundled model is saved once; bundled models before 2026-12-07's third session were saved
    # with both copies and with widths set for parts they do not build: a copy made that way loads
    import shutil

    assert not (ASSETS_DIR / "default_model" / "mllm" / "mllm_config.json").exists()
    bundled_dir = Path(shutil.copytree(ASSETS_DIR / "default_model", tmp_path / "bundled_old_layout"))
    tree = json.loads((bundled_dir / "config.json").read_text())
    assert tree["model"]["head"]["lang_dim"] is None  # not built: written as null
    (bundled_dir / "mllm" / "mllm_config.json").write_text(json.dumps(tree["model"]["mllm"]))
    tree["model"]["head"]["lang_dim"] = 384  # what the folders before held for the unbuilt head
    (bundled_dir / "config.json").write_text(json.dumps(tree))
    bundled = tree["model"]
    default = RISModel.from_pretrained(bundled_dir)
    assert (
        default.mllm.cfg == default.cfg.mllm
        and default.cfg.mllm.pointer_dim == bundled["mllm"]["pointer_dim"]
    )
    assert default.cfg.head.lang_dim is None and default.cfg.projector.vision_dim is None  # not built
    assert default.cfg.projector.llm_dim == bundled["projector"]["llm_dim"] == default.mllm.hidden_size
