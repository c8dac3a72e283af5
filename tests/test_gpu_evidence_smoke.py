"""The GPU evidence kit of issue 16 on CPU: ``benchmarks/bench_gpu_train.py`` at tiny dims, its FLOPs
formula at Llama-2-7B dims, and ``scripts/gpu_evidence.sh`` parses (its full dry run takes minutes:
``bash scripts/gpu_evidence.sh --dry-run``)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _bench():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_gpu_train")
    finally:
        sys.path.remove(str(BENCH))


def test_flops_formula_at_7b_dims() -> None:
    bench = _bench()
    d = bench.DIMS["7b"]
    n = bench.matmul_params(d)
    assert n == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096  # 6.61e9
    f = bench.train_flops(d, batch=8, seq=319, lora_params=4_194_304)
    tokens = 8 * 319
    attn = 2.0 * 32 * 8 * 319**2 * 4096
    assert f["attention_forward"] == attn
    assert f["total"] == pytest.approx(4 * n * tokens + 3 * attn + 6 * 4_194_304 * tokens)
    assert f["total"] < 6 * n * tokens  # a LoRA step is not a full fine-tuning step


def test_bench_gpu_train_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "train_lora.json"
    argv = ["--mode", "lora", "--dims", "tiny", "--device", "cpu", "--threads", "1", "--warmup", "1"]
    argv += ["--steps", "2", "--gradient-checkpointing", "off", "--out", str(out)]
    assert _bench().main(argv) == 0
    rec = json.loads(out.read_text(encoding="utf-8"))
    assert rec["status"] == "ok" and rec["mode"] == "lora" and rec["device_name"] == "cpu"
    assert rec["seq"] == 16 - 1 + 8 and rec["tokens_per_step"] == 2 * rec["seq"]
    assert 0 < rec["lora_params"] < rec["trainable_params"] and rec["linear4bit_layers"] == 0
    assert rec["flops_per_step"]["total"] > 0 and "4*N*T" in rec["flops_formula"]
    assert rec["peak_bf16_flops"] is None and rec["deepspeed"] is None
    run = rec["runs"]["gradient_checkpointing_off"]
    assert run["status"] == "ok" and len(run["step_s_all"]) == 2 and run["loss_finite"]
    assert run["tokens_per_s"] > 0 and run["tflops_per_s"] > 0
    assert run["mfu"] is None and run["peak_memory_mib"] is None  # CPU: no peak FLOPs, no CUDA memory


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_evidence_script_parses() -> None:
    script = ROOT / "scripts" / "gpu_evidence.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    help_text = subprocess.run(["bash", str(script), "--help"], check=True, capture_output=True, text=True)
    assert "--dry-run" in help_text.stdout and "--bundle" in help_text.stdout
