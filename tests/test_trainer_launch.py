"""The trainer in real processes: `accelerate launch` DDP and DeepSpeed ZeRO-2 on 2 CPU ranks, signals.

Each test starts fresh Python processes (the CLI), so each takes tens of seconds on 2 cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _launch_kit import ROOT, TINY_CLASSIC_YAML, launch_cmd, launch_env

from mllm_ris.config import load_config
from mllm_ris.data.synthetic import make_synthref
from mllm_ris.modeling.model import RISModel
from mllm_ris.training.checkpoint import consolidated_state_dict, read_trainer_state
from mllm_ris.training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("launch")
    make_synthref(folder / "synthref", images=10, seed=5, size=64, workers=1, progress=False)
    path = folder / "tiny.yaml"
    path.write_text(TINY_CLASSIC_YAML.format(root=folder / "synthref", head="s2rm"))
    return path


def _launch(accelerate_config: str, *args: str) -> subprocess.CompletedProcess:
    cmd = launch_cmd(accelerate_config, *args)
    out = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _check_two_ranks_in_sync(run: Path, steps: int) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["samples"] == steps * 2 * 2  # 2 ranks x batch 2
    digests = summary["param_digests"]
    assert len(digests) == 2 and digests[0] is not None and digests[0] == digests[1]
    ckpt = run / "checkpoints" / f"step_{steps:06d}"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    merged = consolidated_state_dict(ckpt)
    exported = RISModel.from_pretrained(run).state_dict()  # the final model folder, rebuilt
    assert set(exported) <= set(merged) and all(torch.equal(merged[k], exported[k]) for k in exported)
    return summary


def test_ddp_two_processes_through_accelerate_launch(tmp_path: Path, tiny_yaml: Path) -> None:
    run = tmp_path / "ddp"
    out = _launch(
        "cpu-2proc.yaml", str(tiny_yaml), f"train.output_dir={run}", "train.max_steps=3", "train.save_every=2"
    )
    assert "step 3/3" in out.stdout
    _check_two_ranks_in_sync(run, 3)
    assert (run / "checkpoints" / "step_000002" / "model.safetensors").is_file()


def test_deepspeed_zero2_two_cpu_processes(tmp_path: Path, tiny_yaml: Path) -> None:
    pytest.importorskip("deepspeed")
    run = tmp_path / "zero2"
    _launch("deepspeed-zero2.yaml", str(tiny_yaml), f"train.output_dir={run}", "train.max_steps=3")
    summary = _check_two_ranks_in_sync(run, 3)
    shards = run / "checkpoints" / "step_000003" / "pytorch_model"
    assert len(list(shards.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # optimizer state sharded
    assert all(x is not None for x in summary["losses"])


def _start_cli(tiny_yaml: Path, run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mllm_ris.cli", "train", str(tiny_yaml), f"train.output_dir={run}"]
    cmd += ["train.max_steps=1000", *extra]
    run.mkdir(parents=True)  # output to files: a full pipe would block the progress bar
    out, err = (run / "stdout.txt").open("w"), (run / "stderr.txt").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=out, stderr=err, text=True)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode})")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("training made no progress in time")
        time.sleep(0.2)


def _log(run: Path) -> dict[int, float]:
    path = run / "train_log.jsonl"
    records = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            records[record["step"]] = record["loss"]
    return records


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path: Path, tiny_yaml: Path) -> None:
    run = tmp_path / "run"
    proc = _start_cli(tiny_yaml, run)
    _wait_for(lambda: len(_log(run)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 143, (run / "stderr.txt").read_text()[-2000:]
    assert "stopped by SIGTERM" in (run / "stdout.txt").read_text()
    state = read_trainer_state(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    assert state.step == json.loads((run / "summary.json").read_text())["steps"] >= 2


def test_sigkill_then_resume_from_the_last_complete_checkpoint(tmp_path: Path, tiny_yaml: Path) -> None:
    run = tmp_path / "run"
    proc = _start_cli(tiny_yaml, run, "train.save_every=2")

    def saved_and_moved_on() -> bool:
        latest = run / "checkpoints" / "latest"
        return latest.is_file() and max(_log(run), default=0) > int(latest.read_text().strip()[5:]) + 1

    _wait_for(saved_and_moved_on, proc)
    proc.kill()  # SIGKILL: no handler runs; a checkpoint may be half-written
    proc.wait(timeout=60)
    before = _log(run)
    cfg = load_config(tiny_yaml, [f"train.output_dir={run}", "train.max_steps=1000", "train.save_every=2"])
    trainer = Trainer(cfg, progress=False)
    start = read_trainer_state(trainer.manager.latest()).step
    summary = trainer.fit(resume="auto", stop_at_step=start + 2)
    assert summary.start_step == start and summary.steps == start + 2
    assert not list((run / "checkpoints").glob("*.tmp"))
    # the resumed run reproduces what the killed one logged after its checkpoint (the kill can
    # land just after a later checkpoint; then there may be nothing to compare)
    again = [(loss, before[s]) for s, loss in enumerate(summary.losses, start + 1) if s in before]
    assert all(loss == pytest.approx(logged, rel=1e-5) for loss, logged in again)
    assert sorted(_log(run)) == list(range(1, start + 3))  # no duplicated / stale steps in the log
