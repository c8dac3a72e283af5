"""`mllm-ris export` (LoRA merged, self-contained, atomic) and `mllm-ris eval --checkpoint`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train_mllm import write_configs

from mllm_ris.cli import main
from mllm_ris.config import load_config
from mllm_ris.data.registry import build_dataset
from mllm_ris.data.synthetic import make_synthref
from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.predictor import build_processor
from mllm_ris.training import artifacts as export_module
from mllm_ris.training.artifacts import export_model, find_source, load_trained_model
from mllm_ris.training.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run of a tiny LoRA model with SAM (output_mode auto): final model + checkpoints."""
    folder = tmp_path_factory.mktemp("export")
    make_synthref(folder / "synthref", images=10, seed=5, size=64, workers=1, progress=False)
    files = write_configs(folder / "cfg", folder / "synthref", llm=None, output_mode="auto", batch=2)
    overrides = [
        f"train.output_dir={folder / 'run'}",
        "train.max_steps=4",
        "train.save_every=2",
        "data.val=[]",
    ]
    Trainer(load_config(files, overrides), progress=False).fit()
    return folder / "run"


def _outputs(model: RISModel, samples: list) -> tuple[torch.Tensor, ...]:
    batch = build_processor(model, image_size=64)(samples)
    with torch.no_grad():
        out = model(batch)
    gen = model.generate(build_processor(model, image_size=64, answers=False)(samples), max_new_tokens=8)
    return out.loss, out.mask_logits, out.sam_logits, out.no_target_prob, gen.masks, gen.text


def test_export_merges_lora_and_reproduces_the_trained_model(run: Path, tmp_path: Path) -> None:
    assert find_source(run) == ("model", run)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    parts = {"head", "pixel_encoder", "projector", "vision", "sam_stage", "prompt_builder"}
    assert {f"{p}.safetensors" for p in parts} | {"config.json", "mllm"} <= files
    assert not (out / "mllm" / "adapter").exists() and (out / "mllm" / "llm" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".exported.*"))  # the temporary folder was renamed
    exported = RISModel.from_pretrained(out)
    assert exported.cfg.mllm.lora.enabled is False
    assert json.loads((out / "config.json").read_text())["data"]["image_size"] == 64
    trained = RISModel.from_pretrained(run)  # LoRA unmerged
    samples = [build_dataset("synthref", str(run.parent / "synthref"), "val")[i] for i in range(3)]
    for got, want in zip(_outputs(exported, samples), _outputs(trained, samples), strict=True):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # merged weights: float rounding
        else:
            assert got == want


def test_export_adapter_keeps_lora_over_a_base_read_from_its_path(
    tmp_path: Path, synthref: Path, llm_dir: Path, run: Path
) -> None:
    """``--adapter``: the adapter, token rows and heads only; the base is read from name_or_path."""
    files = write_configs(tmp_path / "cfg", synthref, llm=llm_dir, output_mode="direct", batch=2)
    overrides = [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "data.val=[]"]
    Trainer(load_config(files, overrides), progress=False).fit()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "a"), "--adapter"]) == 0
    assert (tmp_path / "a" / "mllm" / "adapter").is_dir() and not (tmp_path / "a" / "mllm" / "llm").exists()
    export_model(tmp_path / "run", tmp_path / "merged")
    adapter, merged = RISModel.from_pretrained(tmp_path / "a"), RISModel.from_pretrained(tmp_path / "merged")
    assert adapter.cfg.mllm.lora.enabled and not merged.cfg.mllm.lora.enabled
    samples = [build_dataset("synthref", str(synthref), "val")[i] for i in range(2)]
    for got, want in zip(_outputs(adapter, samples), _outputs(merged, samples), strict=True):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        else:
            assert got == want
    with pytest.raises(ConfigError, match="random base LLM that no path rebuilds"):
        export_model(run, tmp_path / "b", adapter=True)


def test_export_of_a_checkpoint_equals_the_final_model(run: Path, tmp_path: Path) -> None:
    (tmp_path / "from_ckpt").mkdir()
    (tmp_path / "from_ckpt" / "stale.txt").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export_model(run / "checkpoints" / "step_000004", tmp_path / "from_ckpt")
    loaded = export_model(run / "checkpoints" / "step_000004", tmp_path / "from_ckpt", overwrite=True)
    assert loaded.kind == "checkpoint" and not (tmp_path / "from_ckpt" / "stale.txt").exists()
    a = RISModel.from_pretrained(tmp_path / "from_ckpt").state_dict()
    export_model(run, tmp_path / "from_run")
    b = RISModel.from_pretrained(tmp_path / "from_run").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stopped = shutil.copytree(run, tmp_path / "stopped")  # a run whose last invocation was stopped
    summary = json.loads((stopped / "summary.json").read_text())
    (stopped / "summary.json").write_text(json.dumps({**summary, "interrupted": "SIGTERM"}))
    assert find_source(stopped) == ("checkpoint", stopped / "checkpoints" / "step_000004")


def test_interrupted_export_leaves_nothing(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def half_written(model: RISModel, folder: Path, config: dict) -> Path:
        (Path(folder) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_model_folder", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_model(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    capsys.readouterr()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mllm-ris: error: ") and "neither a model folder" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_checkpoint_prints_metrics_and_writes_json(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export_model(run, tmp_path / "exported")
    root = str(run.parent / "synthref")
    args = ["eval", "--dataset", "synthref", "--root", root, "--limit", "4", "--batch-size", "2"]
    capsys.readouterr()
    assert main([*args, "--checkpoint", str(tmp_path / "exported"), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "cIoU" in out and "metrics.json" in out
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert report["samples"] == 4 and report["predictor"] == "ris-model"
    # a training checkpoint evaluates directly, as its unmerged model (the step-4 weights)
    ckpt = str(run / "checkpoints" / "step_000004")
    assert main([*args, "--checkpoint", ckpt, "--out", str(tmp_path / "b"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert printed["cIoU"] == pytest.approx(report["cIoU"], abs=1e-3)  # merged vs unmerged LoRA
    assert load_trained_model(ckpt).image_size == 64
