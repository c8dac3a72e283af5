"""Classic mode's region pointer (``model.pointer.dim``, no LLM): the text encoder's sentence query and
words score descriptor-only region tokens; prior / direct output, losses, the reject decision from the
pointer, errors, the frozen text encoder's memo, training through the trainer, export and loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_model_kit import BLUE, GREEN, RED, SIZE, scene, synth_samples, tiny_cfg

from mllm_ris.config import load_config
from mllm_ris.errors import ConfigError
from mllm_ris.modeling.losses import region_coverage
from mllm_ris.modeling.model import PRIOR_CLAMP, RISModel, build_model
from mllm_ris.modeling.predictor import RISPredictor, build_processor
from mllm_ris.modeling.projector import paint_regions
from mllm_ris.training.artifacts import export_model, load_trained_model
from mllm_ris.training.ris_task import RISTask
from mllm_ris.training.trainer import Trainer

POINTER = ("model.pointer.dim=16", "model.projector.descriptors=true", "model.projector.tower=false")


def _build(output_mode: str = "prior", *extra: str) -> RISModel:
    torch.manual_seed(0)
    return build_model(tiny_cfg("classic", output_mode, *POINTER, *extra))


@pytest.mark.parametrize("output_mode", ["prior", "direct"])
def test_classic_pointer_prior_losses_and_gradients(output_mode: str) -> None:
    model = _build(output_mode).train()
    assert model.mllm is None and model.vision is None and model.pointer is not None
    batch = build_processor(model, image_size=SIZE)(synth_samples())
    assert batch.input_ids is None and batch.regions is not None  # no chat: no LLM to read it
    out = model(batch)
    k = int(model.projector.num_tokens(batch.superpixels).max())
    assert out.region_logits.shape == (3, 1, k) and out.prior.shape == (3, 1, SIZE, SIZE)
    labels = model.projector.region_labels(batch.superpixels)
    painted = paint_regions(out.region_logits, labels).clamp(-PRIOR_CLAMP, PRIOR_CLAMP)
    torch.testing.assert_close(out.prior, painted)
    expected = {"region_bce", "region_dice"} | (
        {"head_bce", "head_dice"} if output_mode == "direct" else set()
    )
    assert expected <= set(out.loss_terms) and "lm" not in out.loss_terms
    if output_mode == "prior":  # classic: the prior itself (no region forced on: none above 0 = none)
        torch.testing.assert_close(out.masks, out.prior)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pointer.parameters())
    assert all(p.grad is not None for p in model.projector.desc_mlp.parameters())
    assert model.text_encoder.token_proj.weight.grad.abs().sum() > 0  # the words reach the pointer
    if output_mode == "direct":
        assert [p.grad for p in model.head.parameters() if p.grad is not None]
    else:  # prior: no pixel side to train (none is built)
        assert model.head is None and model.pixel_encoder is None


@pytest.mark.parametrize(
    "extra", [(), ("model.projector.image_encoder=cnn",)], ids=["descriptors", "image_cnn"]
)
def test_classic_pointer_learns_the_sentence_and_rejects_from_the_pointer(extra: tuple[str, ...]) -> None:
    """Overfit three sentences about one image: two name different objects, one names none. Each named
    object's query then points inside its own target, and the absent one paints nothing (no region
    above 0), which the predictor reports as "no target". The same with the image CNN's region
    features (``projector.image_encoder: cnn``), which training and the predictor both feed."""
    shapes = [("disc", RED, 20, 22, 12), ("square", BLUE, 44, 44, 10), ("disc", GREEN, 46, 14, 8)]
    texts = ((0, "the red circle"), (1, "the blue square"), (None, "the yellow star"))
    samples = [scene(7, [(*s, i == t) for i, s in enumerate(shapes)], text) for t, text in texts]
    model = _build("prior", *extra).train()
    batch = build_processor(model, image_size=SIZE)(samples)
    labels = model.projector.region_labels(batch.superpixels)
    coverage = region_coverage(labels, batch.targets[:, None], int(labels.max()) + 1)[:, 0]  # (3, K)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    for _ in range(200):
        out = model(batch)
        best = out.region_logits[:2, 0].argmax(-1)  # (2,) the chosen region of the named objects
        inside = (coverage[:2].gather(1, best[:, None]) >= 0.5).all()
        if inside and out.region_logits[2].max() < 0 and (out.region_logits[:2].amax(-1) > 0).all():
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert inside and best[0] != best[1]
    model.eval()
    predictions = RISPredictor(model, image_size=SIZE).predict(samples)
    assert [len(p.masks) for p in predictions] == [1, 1, 0]
    assert predictions[2].no_target_prob > 0.5 > predictions[0].no_target_prob


def test_classic_pointer_presence_decides_no_target() -> None:
    """``pointer.presence``: a no-target sentence trains the presence logit (``no_target``), not its
    regions; after overfitting the absent object's answer is "no target" whatever its regions score."""
    shapes = [("disc", RED, 20, 22, 12), ("square", BLUE, 44, 44, 10), ("disc", GREEN, 46, 14, 8)]
    texts = ((0, "the red circle"), (1, "the blue square"), (None, "the yellow star"))
    samples = [scene(7, [(*s, i == t) for i, s in enumerate(shapes)], text) for t, text in texts]
    model = _build("prior", "model.pointer.presence=true").train()
    batch = build_processor(model, image_size=SIZE)(samples)
    out = model(batch)
    assert "no_target" in out.loss_terms and out.loss_terms["no_target"] > 0
    region_terms = out.loss_terms["region_bce"] + out.loss_terms["region_dice"]
    (grad,) = torch.autograd.grad(region_terms, out.region_logits, retain_graph=True)  # (3, 1, K)
    assert grad[:2].abs().sum() > 0 and not grad[2].any()  # the negative's regions: no gradient
    out.loss_terms["no_target"].backward()
    assert model.pointer.presence[0].weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    for _ in range(200):
        out = model(batch)
        if (out.no_target_prob[:2] < 0.2).all() and out.no_target_prob[2] > 0.8:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    predictions = RISPredictor(model, image_size=SIZE).predict(samples)
    assert [len(p.masks) for p in predictions] == [1, 1, 0]
    assert predictions[2].no_target_prob > 0.5 > predictions[0].no_target_prob


def test_classic_pointer_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"pointer\.dim: classic mode's pointer reads region tokens"):
        build_model(tiny_cfg("classic", "prior", "model.pointer.dim=16", "model.projector.descriptors=true"))
    with pytest.raises(ConfigError, match=r"pointer\.dim: the classic-mode pointer; in mllm mode"):
        build_model(tiny_cfg("mllm", "direct", *POINTER))
    with pytest.raises(ConfigError, match=r"dim: must be a multiple of 4"):
        tiny_cfg("classic", "prior", "model.pointer.dim=6")
    with pytest.raises(ConfigError, match=r"output_mode prior needs a region pointer"):
        model = build_model(tiny_cfg("classic", "prior"))
        model(build_processor(model, image_size=SIZE)(synth_samples()))
    model = _build("prior")
    plain = build_processor(build_model(tiny_cfg("classic", "direct")), image_size=SIZE)(synth_samples())
    with pytest.raises(ValueError, match="needs superpixels and region descriptors"):
        model(plain)


@pytest.mark.parametrize(("pointer", "words"), [(True, True), (True, False), (False, False)])
def test_word_projection_trains_when_the_pointer_reads_the_words(pointer: bool, words: bool) -> None:
    """LTS reads only the sentence query, so the text encoder's word projection is frozen, unless the
    pointer's mixing layers read the words (``pointer.words``)."""
    extra = (*POINTER, f"model.pointer.words={str(words).lower()}") if pointer else ()
    model = build_model(tiny_cfg("classic", "direct", "model.head.name=lts", *extra))
    assert not model.head.uses_words
    assert model.text_encoder.token_proj.weight.requires_grad == words


def test_frozen_text_encoder_memo_gives_the_same_features() -> None:
    encoder = build_model(tiny_cfg("classic", "direct")).text_encoder
    texts = ["the red circle on the left", "a square", "the big blue one below it", "a square"]
    tokens = encoder.tokenize(texts)
    direct = encoder(tokens["input_ids"], tokens["attention_mask"])
    encoder.memo_size = 2
    for _ in range(2):  # cold, then (partly) from the memo; the memo stays bounded
        memo = encoder.encode(texts)
        assert torch.equal(memo.mask, direct.mask) and len(encoder._memo) <= 2
        torch.testing.assert_close(memo.tokens, direct.tokens)  # padding too
        torch.testing.assert_close(memo.queries, direct.queries)
    with torch.no_grad():  # new weights (a loaded state dict, an optimizer step): the memo starts over
        next(encoder.model.parameters()).add_(1.0)
    tokens = encoder.tokenize(texts[:1])
    torch.testing.assert_close(
        encoder.encode(texts[:1]).queries, encoder(tokens["input_ids"], tokens["attention_mask"]).queries
    )
    # under DeepSpeed ZeRO-3 (weights tagged ds_id) every rank must run the transformer: no memo
    encoder._memo.clear()
    next(encoder.model.parameters()).ds_id = 0
    encoder.encode(texts)
    assert len(encoder._memo) == 0


def _same(ref: list, got: list) -> bool:
    pairs = zip(ref, got, strict=True)
    return all(torch.equal(torch.as_tensor(a), torch.as_tensor(p.masks)) for a, p in pairs)


def test_classic_pointer_trains_exports_and_loads(tmp_path: Path, synthref: Path) -> None:
    """It trains as a RISModel run (RISTask: the model folder, checkpoints), and its run folder,
    checkpoint and export load back to the same predictions."""
    from test_model_kit import TINY

    overrides = [
        *TINY, *POINTER, "model.mode=classic", "model.output_mode=prior",
        f"data.train.0.root={synthref}", "data.train.0.name=synthref",
        f"data.val=[{{name: synthref, root: {synthref}, split: val}}]", "data.image_size=64",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.batch_size=2",
        "train.save_every=4", "train.tensorboard=false", "eval.limit=3",
        f"model.superpixels.cache_dir={tmp_path / 'sp-cache'}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, progress=False)
    assert isinstance(trainer.task, RISTask) and trainer.task.name == "classic"
    summary = trainer.fit()
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert summary.steps == 4 and '"region_bce"' in log and '"lm"' not in log
    run, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_000004"
    samples = synth_samples()
    ref = [p.masks for p in RISPredictor(RISModel.from_pretrained(run), image_size=64).predict(samples)]
    for source in (run, checkpoint):
        loaded = load_trained_model(source)
        got = RISPredictor(loaded.model, image_size=loaded.image_size).predict(samples)
        assert _same(ref, got)
    export_model(checkpoint, tmp_path / "export")
    exported = RISModel.from_pretrained(tmp_path / "export")
    assert exported.pointer is not None and exported.mode == "classic"
    assert any((tmp_path / "sp-cache").iterdir())  # the run cached its label maps there
    assert exported.cfg.superpixels.cache_dir is None  # an export does not name the run's cache
    got = RISPredictor(exported, image_size=64).predict(samples)
    assert _same(ref, got)
