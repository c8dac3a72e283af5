"""The `mllm-ris` command: help, planned subcommands, config printing, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mllm_ris.cli import build_parser, main


def test_console_script_runs() -> None:
    out = subprocess.run(["mllm-ris", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("mllm-ris ")


def test_module_entry_point_runs() -> None:  # `accelerate launch -m mllm_ris.cli ...` relies on it
    out = subprocess.run([sys.executable, "-m", "mllm_ris.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    built = ("data", "make-synthref", "eval", "config", "train", "export", "segment", "chat", "demo", "app")
    for command in built:
        assert command in out.stdout


def test_export_is_a_command_with_one_line_errors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"mllm-ris: error: {tmp_path / 'missing'}: no such folder\n"


def test_inference_commands_are_not_planned() -> None:
    for command in ("segment", "chat", "demo", "app"):  # built: tests/test_cli_inference.py, test_app.py
        build_parser().parse_args([command, "x"] if command in ("segment", "chat") else [command])


def test_train_errors_are_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("mllm-ris: error: config file not found")
    config = tmp_path / "mllm.yaml"
    config.write_text("model: {mode: mllm}\n")
    assert main(["train", str(config), "--time-budget", "0"]) == 2
    assert capsys.readouterr().err == "mllm-ris: error: --time-budget: must be > 0, got 0.0\n"
    assert main(["train", str(config)]) == 2  # mllm mode trains (tests/test_train_mllm.py); no data root
    assert capsys.readouterr().err.startswith("mllm-ris: error: data: dataset 'synthref' needs a root")
    assert main(["train", "train.lr=0.1"]) == 2
    assert "at least one YAML config file" in capsys.readouterr().err


def test_config_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "train.lr=0.5", "model.head.name=lts"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["train"]["lr"] == 0.5
    assert tree["model"]["head"]["name"] == "lts"


def test_config_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "train.lr=x"]) == 2
    err = capsys.readouterr().err
    assert err == "mllm-ris: error: train.lr: expected a float, got 'x'\n"


def test_unknown_dataset_is_rejected_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["data", "check", "--dataset", "coco", "--root", "."])
    assert info.value.code == 2
    assert "invalid choice: 'coco'" in capsys.readouterr().err


def test_eval_requires_checkpoint_or_predictor(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--dataset", "refcoco", "--root", "."])
    assert "one of the arguments --checkpoint --predictor is required" in capsys.readouterr().err


def test_eval_checkpoint_errors_are_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--dataset", "refcoco", "--root", str(tmp_path), "--checkpoint", str(tmp_path)])
    assert code == 2  # built: tests/test_export.py
    err = capsys.readouterr().err
    assert err.startswith("mllm-ris: error: ") and "not available yet" not in err
    assert len(err.strip().splitlines()) == 1
