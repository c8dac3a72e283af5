"""MLLM-mode training through the model-agnostic trainer: registration, exact resume with an LLM
base left out of checkpoints, the `mllm-ris train` command with two config files, 2-process DDP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from _launch_kit import launch_cmd, launch_env
from safetensors import safe_open
from safetensors.torch import load_file

from mllm_ris.cli import main
from mllm_ris.config import Config, load_config
from mllm_ris.errors import ConfigError
from mllm_ris.modeling.model import RISModel
from mllm_ris.training.checkpoint import consolidated_state_dict
from mllm_ris.training.ris_task import RISTask, tie_all_parameters
from mllm_ris.training.sampling import MixtureSampler, build_mixture
from mllm_ris.training.task import TrainTask
from mllm_ris.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = """
model:
  mode: mllm
  output_mode: {output_mode}
  vision: {{random_image_size: 32, random_hidden_size: 16, random_patch_size: 4}}
  projector: {{num_heads: 2}}
  mllm:
    name_or_path: {llm}
    seg_dim: 16
    random_hidden_size: 32
    random_intermediate_size: 64
    lora: {{enabled: true, dropout: 0.0}}
  pixel: {{cnn_widths: [8, 8, 16, 16], cnn_norm: gn}}
  head: {{name: s2rm, dim: 16, num_heads: 2}}
  sam: {{variant: tiny, img_size: 64}}
"""
TINY_TRAIN = """
data:
  train: [{{name: synthref, root: {root}, split: train}}]
  val: [{{name: synthref, root: {root}, split: val}}]
  image_size: 64
train:
  batch_size: {batch}
  lr: 1.0e-3
  warmup_steps: 2
  log_every: 1
  tensorboard: false
eval:
  limit: 4
"""


def write_configs(folder: Path, root: Path, *, llm: Path | None, output_mode: str, batch: int) -> list[Path]:
    """A tiny model YAML (LoRA on, base from ``llm`` or random) and a training YAML, as two files."""
    folder.mkdir(parents=True, exist_ok=True)
    model, train = folder / "model.yaml", folder / "train.yaml"
    model.write_text(TINY_MODEL.format(output_mode=output_mode, llm=llm or "null"))
    train.write_text(TINY_TRAIN.format(root=root, batch=batch))
    return [model, train]


def _cfg(files: list[Path], out: Path, *extra: str) -> Config:
    return load_config(files, [f"train.output_dir={out}", *extra])


def test_mllm_task_fits_the_protocol(tmp_path: Path, synthref: Path) -> None:
    files = write_configs(tmp_path, synthref, llm=None, output_mode="direct", batch=2)
    task = RISTask(_cfg(files, tmp_path / "run"))
    assert isinstance(task, RISTask) and isinstance(task, TrainTask)
    assert task.superpixel_cache_dir == tmp_path / "run" / "superpixel_cache"
    assert task.external_weights(task.build_model()) == set()  # random tiny parts: all in checkpoints
    loss = torch.tensor(2.0, requires_grad=True)
    p = torch.nn.Parameter(torch.ones(3))
    tied = tie_all_parameters(loss, [p])
    tied.backward()
    assert tied.item() == 2.0 and torch.equal(p.grad, torch.zeros(3))  # in the graph, zero gradient


def test_mllm_10_steps_equal_5_plus_resumed_5(tmp_path: Path, synthref: Path, llm_dir: Path) -> None:
    files = write_configs(tmp_path, synthref, llm=llm_dir, output_mode="auto", batch=2)
    extra = ("train.max_steps=10",)
    full = Trainer(_cfg(files, tmp_path / "a", *extra, "train.eval_every=5"), progress=False).fit()
    first = Trainer(_cfg(files, tmp_path / "b", *extra), progress=False).fit(stop_at_step=5)
    rest = Trainer(_cfg(files, tmp_path / "b", *extra), progress=False).fit(resume="auto")
    assert (first.steps, rest.start_step, rest.steps) == (5, 5, 10)
    assert first.losses + rest.losses == full.losses  # bit-identical
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert {"lm", "no_target", "head_bce", "head_dice", "iou", "sam_bce", "sam_dice"} <= set(log[0])
    assert (tmp_path / "a" / "eval" / "step_000005" / "synthref_val" / "metrics.json").is_file()
    assert full.eval["synthref:val"].samples == 4
    # the frozen LLM base (from llm_dir) stays out of checkpoints; LoRA and everything else is in
    ckpt = tmp_path / "b" / "checkpoints" / "step_000010" / "model.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        keys = set(f.keys())
    assert not any("base_layer" in k or k.endswith("input_layernorm.weight") for k in keys)
    assert any("lora_A" in k for k in keys) and any(k.startswith("head.") for k in keys)
    a, b = RISModel.from_pretrained(tmp_path / "a"), RISModel.from_pretrained(tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["data"]["image_size"] == 64
    assert any((tmp_path / "a" / "superpixel_cache").rglob("*.npy"))


def test_pointer_warmup_then_full_steps(tmp_path: Path, synthref: Path) -> None:
    """train.pointer_warmup_steps: the first steps log only language-side terms, the rest the head's too."""
    files = write_configs(tmp_path, synthref, llm=None, output_mode="direct", batch=2)
    pointer = ("model.mllm.pointer_dim=16", "model.projector.descriptors=true")
    cfg = _cfg(files, tmp_path / "run", "train.max_steps=4", "train.pointer_warmup_steps=2", *pointer)
    Trainer(cfg, progress=False).fit()
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "region_bce" in r]
    assert [("head_bce" in r) for r in steps] == [False, False, True, True]
    with pytest.raises(ConfigError, match="pointer_warmup_steps: needs the region pointer"):
        RISTask(_cfg(files, tmp_path / "x", "train.pointer_warmup_steps=2"))


def test_prior_checkpoint_with_an_unused_pixel_side(tmp_path: Path, synthref: Path) -> None:
    """A prior-mode training checkpoint written when prior mode still built the pixel side (its
    model.safetensors holds head / pixel_encoder weights): it exports (those weights dropped, the same
    predictions), a resume refuses it in one line naming the way out, and that way trains."""
    from safetensors.torch import save_file

    from mllm_ris.errors import CheckpointError
    from mllm_ris.training.artifacts import export_model, load_trained_model

    files = write_configs(tmp_path, synthref, llm=None, output_mode="prior", batch=2)
    pointer = ("model.mllm.pointer_dim=16", "model.projector.descriptors=true", "train.save_every=2")
    cfg = _cfg(files, tmp_path / "run", "train.max_steps=2", *pointer)
    Trainer(cfg, progress=False).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    state = load_file(str(ckpt / "model.safetensors"))
    assert not any(k.startswith(("head.", "pixel_encoder.")) for k in state)
    old = {
        **state,
        "head.query_proj.0.weight": torch.zeros(4, 4),
        "pixel_encoder.stem.0.weight": torch.ones(2),
    }
    save_file(old, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_trained_model(ckpt).model
    assert loaded.head is None and loaded.pixel_encoder is None
    export_model(ckpt, tmp_path / "exported")
    assert RISModel.from_pretrained(tmp_path / "exported").head is None
    more = _cfg(files, tmp_path / "run", "train.max_steps=3", *pointer)
    with pytest.raises(CheckpointError, match=r"unexpected .*export .* model\.checkpoint=DIR$"):
        Trainer(more, progress=False).fit(resume="auto")
    again = _cfg(
        files, tmp_path / "again", "train.max_steps=1", f"model.checkpoint={tmp_path / 'exported'}", *pointer
    )
    assert Trainer(again, progress=False).fit().steps == 1


def test_warm_start_in_another_prompt_layout(tmp_path: Path, synthref: Path) -> None:
    """``model.checkpoint`` fixes the architecture and weights; the run's ``mllm.image_position`` (a
    layout, no weight) applies to the continued model, its batches and the folder it writes."""
    from mllm_ris.processing.processor import IMAGE_TOKEN

    files = write_configs(tmp_path, synthref, llm=None, output_mode="prior", batch=2)
    pointer = ("model.mllm.pointer_dim=16", "model.projector.descriptors=true")
    Trainer(_cfg(files, tmp_path / "first", "train.max_steps=1", *pointer), progress=False).fit()
    assert RISModel.from_pretrained(tmp_path / "first").mllm.cfg.image_position == "first"
    cont = _cfg(
        files,
        tmp_path / "after",
        "train.max_steps=1",
        f"model.checkpoint={tmp_path / 'first'}",
        "model.mllm.image_position=after_question",
        *pointer,
    )
    task = RISTask(cont)
    model = task.build_model()
    assert model.mllm is not None and model.mllm.cfg.image_position == "after_question"
    sample = task.train_data()[0][0]
    batch = task.collate([sample])
    text = model.mllm.tokenizer.decode(batch.input_ids[0], skip_special_tokens=False)
    question, rest = text.split(IMAGE_TOKEN)
    assert "segment" in question.lower() or "where" in question.lower() or "what" in question.lower()
    assert rest.lstrip().startswith("ASSISTANT:")
    Trainer(cont, progress=False).fit()
    assert RISModel.from_pretrained(tmp_path / "after").mllm.cfg.image_position == "after_question"


@pytest.mark.parametrize("output_mode", ["direct", "auto"])
def test_refine_a_frozen_pointer_model_with_a_head_on_its_prior(
    tmp_path: Path, synthref: Path, output_mode: str
) -> None:
    """``model.refine_from``: a prior-mode pointer model's language side is loaded and frozen (kept in
    eval mode), a new pixel side (head reading the prior; with ``auto`` the tiny SAM too) is the only
    trainable part; the run's folder and checkpoints rebuild the merged model, whose language side is
    the pointer model's."""
    from mllm_ris.modeling.model_io import is_pixel_side
    from mllm_ris.training.artifacts import load_trained_model

    files = write_configs(tmp_path, synthref, llm=None, output_mode="prior", batch=2)
    pointer = ("model.mllm.pointer_dim=16", "model.projector.descriptors=true")
    Trainer(_cfg(files, tmp_path / "pointer", "train.max_steps=1", *pointer), progress=False).fit()
    refine = (
        "model.mode=classic",  # the run's own mode / language side are replaced by the folder's
        f"model.refine_from={tmp_path / 'pointer'}",
        f"model.output_mode={output_mode}",
        "model.head.prior_input=true",
        "train.max_steps=2",
        "train.save_every=2",
    )
    cfg = _cfg(files, tmp_path / "refined", *refine)
    task = RISTask(cfg)
    model = task.build_model()
    assert model.mode == "mllm" and model.head is not None and model.head.cfg.prior_input
    trainable = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == (
        {"pixel_encoder", "head"} | ({"sam_stage", "prompt_builder"} if output_mode == "auto" else set())
    )
    model.train()
    assert model.head.training and not model.mllm.training and not model.projector.training
    Trainer(cfg, progress=False).fit()
    base = RISModel.from_pretrained(tmp_path / "pointer").state_dict()
    refined = RISModel.from_pretrained(tmp_path / "refined")
    assert refined.cfg.output_mode == output_mode and refined.head is not None
    state = refined.state_dict()
    for key, value in base.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert any(is_pixel_side(k) for k in state)
    assert refined.head.prior_scale.abs().item() > 0  # the head trained
    ckpt = load_trained_model(tmp_path / "refined" / "checkpoints" / "step_000002").model.state_dict()
    assert ckpt.keys() == state.keys() and all(torch.equal(ckpt[k], state[k]) for k in state)


def test_refine_from_refuses_a_model_without_a_pointer_and_a_second_start(
    tmp_path: Path, synthref: Path
) -> None:
    files = write_configs(tmp_path, synthref, llm=None, output_mode="direct", batch=2)
    Trainer(_cfg(files, tmp_path / "plain", "train.max_steps=1"), progress=False).fit()
    refine = (f"model.refine_from={tmp_path / 'plain'}", "model.head.prior_input=true")
    with pytest.raises(ConfigError, match="has no region pointer"):
        RISTask(_cfg(files, tmp_path / "out", *refine))
    with pytest.raises(ConfigError, match="not both"):
        _cfg(files, tmp_path / "out", *refine, f"model.checkpoint={tmp_path / 'plain'}")
    with pytest.raises(ConfigError, match="needs a pixel side"):
        _cfg(files, tmp_path / "out", *refine, "model.output_mode=prior")


def test_train_command_with_two_config_files(
    tmp_path: Path, synthref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(ROOT / "configs" / "model" / "tiny-synth.yaml"),
            str(ROOT / "configs" / "train" / "synthref-mllm.yaml"),
            f"data.train.0.root={synthref}",
            f"data.val.0.root={synthref}",
            f"train.output_dir={run}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.tensorboard=false",
            "eval.limit=2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step 2/2" in out and "synthref:val: cIoU" in out
    model = RISModel.from_pretrained(run)
    assert model.mode == "mllm" and model.cfg.projector.kind == "superpixel"
    assert json.loads((run / "config.json").read_text())["data"]["image_size"] == 128


def _launch(accelerate_config: str, files: list[Path], run: Path, *extra: str) -> None:
    """``accelerate launch --config_file configs/accelerate/<accelerate_config> -m mllm_ris.cli train``."""
    cmd = launch_cmd(accelerate_config, *map(str, files), f"train.output_dir={run}", *extra)
    env = launch_env()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["samples"] == 12
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] is not None and digests[0] == digests[1]


def _ranks_see_a_no_target_batch(files: list[Path]) -> bool:
    cfg = load_config(files)
    dataset, weights = build_mixture(cfg.data.train)
    stream = MixtureSampler(weights, batch_size=1, seed=cfg.train.seed, start=0, rank=0, world_size=1)
    return any(dataset[stream.index_at(p)].masks.shape[0] == 0 for p in range(12))


def test_ddp_two_processes_with_a_no_target_batch(tmp_path: Path, synthref: Path) -> None:
    """With batch 1 a rank meets a no-target sample (T = 0); without the loss tie DDP fails a step later."""
    files = write_configs(tmp_path, synthref, llm=None, output_mode="auto", batch=1)
    assert _ranks_see_a_no_target_batch(files)
    run = tmp_path / "ddp"
    _launch("cpu-2proc.yaml", files, run, "train.max_steps=6", "train.save_every=3", "data.val=[]")
    merged = consolidated_state_dict(run / "checkpoints" / "step_000006")
    final = RISModel.from_pretrained(run).state_dict()
    head = load_file(str(run / "head.safetensors"))
    assert all(torch.equal(merged[f"head.{k}"], v) for k, v in head.items())
    assert set(merged) == set(final)  # nothing external in the tiny model


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_and_export_of_its_shards(tmp_path: Path, synthref: Path) -> None:
    """ZeRO-2 with the same no-target batch; the sharded checkpoint exports to the final model."""
    pytest.importorskip("deepspeed")
    from mllm_ris.training.artifacts import export_model

    files = write_configs(tmp_path, synthref, llm=None, output_mode="auto", batch=1)
    run = tmp_path / "zero2"
    _launch("deepspeed-zero2.yaml", files, run, "train.max_steps=6", "data.val=[]")
    export_model(run / "checkpoints" / "step_000006", tmp_path / "from_shards")
    export_model(run, tmp_path / "from_final")
    a = RISModel.from_pretrained(tmp_path / "from_shards").state_dict()
    b = RISModel.from_pretrained(tmp_path / "from_final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
