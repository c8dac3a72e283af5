"""Checkpoint files (atomic commit, latest, keep-last-N, resume lookup) and the mixture sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm_ris.errors import CheckpointError
from mllm_ris.training.checkpoint import (
    CheckpointManager,
    TrainerState,
    consolidated_state_dict,
    read_trainer_state,
    resolve_start,
)
from mllm_ris.training.faults import BadStepGuard, NonFiniteLossError, exit_code_for
from mllm_ris.training.optim import lr_factor
from mllm_ris.training.sampling import MixtureSampler


def _save(manager: CheckpointManager, step: int) -> Path:
    tmp = manager.begin(step)
    (tmp / "payload.txt").write_text(str(step))
    return manager.commit(step, tmp, TrainerState(step=step, samples=10 * step), {"note": step})


def test_commit_renames_points_latest_and_keeps_last_n(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        final = _save(manager, step)
        assert final.name == f"step_{step:06d}" and not (final.parent / f"{final.name}.tmp").exists()
    assert [s for s, _ in manager.complete()] == [4, 6]  # step 2 pruned
    assert (manager.root / "latest").read_text().strip() == "step_000006"
    assert manager.latest() == manager.root / "step_000006"
    state = read_trainer_state(manager.latest())
    assert (state.step, state.samples) == (6, 60)
    assert json.loads((manager.latest() / "config.json").read_text()) == {"note": 6}
    _save(manager, 6)  # the same step again replaces it
    assert [s for s, _ in manager.complete()] == [4, 6]


def test_partial_write_is_ignored_and_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    _save(manager, 2)
    tmp = manager.begin(4)  # a writer died here: files but no trainer_state.json, no rename
    (tmp / "model.safetensors").write_bytes(b"\0" * 10)
    unrenamed = manager.root / "step_000005"  # renamed dir without a state file is not complete
    unrenamed.mkdir()
    assert manager.latest() == manager.root / "step_000002"
    assert resolve_start("auto", manager, overwrite=False) == str(manager.root / "step_000002")
    assert not tmp.exists()  # resolve_start cleaned the leftover
    assert (manager.root / "step_000002" / "payload.txt").read_text() == "2"


def test_resolve_start_rules(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run", keep_last=5)
    assert resolve_start(None, manager, overwrite=False) is None  # empty folder: fresh
    assert resolve_start("auto", manager, overwrite=False) is None  # nothing to resume: fresh
    with pytest.raises(CheckpointError, match=r"needs train\.output_dir"):
        resolve_start("auto", None, overwrite=False)
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        resolve_start(str(tmp_path / "nowhere"), manager, overwrite=False)
    first, second = _save(manager, 2), _save(manager, 4)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints .*--resume auto"):
        resolve_start(None, manager, overwrite=False)
    with pytest.raises(CheckpointError, match="newer than"):
        resolve_start(str(first), manager, overwrite=False)
    assert resolve_start(str(second), manager, overwrite=False) == str(second)
    assert resolve_start(str(first), manager, overwrite=True) == str(first)
    assert [s for s, _ in manager.complete()] == [2]  # the newer one was removed
    assert resolve_start(None, manager, overwrite=True) is None
    assert manager.complete() == []


def test_consolidated_state_dict_reads_accelerate_layout(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"module.w": torch.ones(2), "module.b": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    state = consolidated_state_dict(tmp_path)
    assert set(state) == {"w", "b"} and torch.equal(state["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors"):
        consolidated_state_dict(tmp_path / "empty")


def test_sampler_is_a_pure_function_of_position() -> None:
    weights = torch.tensor([3.0, 1.0, 0.0, 0.0] + [0.0] * 6)  # only indices 0 and 1 can be drawn
    full = MixtureSampler(weights, batch_size=2, seed=7)
    stream = [idx for idx, _ in zip(full, range(40), strict=False)]
    assert set(stream) <= {0, 1} and stream.count(0) > stream.count(1)
    resumed = MixtureSampler(weights, batch_size=2, seed=7, start=12)
    assert [i for i, _ in zip(resumed, range(28), strict=False)] == stream[12:]
    # two ranks interleave micro-batches of the same global stream
    ranks = [MixtureSampler(weights, batch_size=2, seed=7, rank=r, world_size=2) for r in (0, 1)]
    r0, r1 = ([i for i, _ in zip(s, range(10), strict=False)] for s in ranks)
    assert r0[:2] + r1[:2] + r0[2:4] + r1[2:4] == stream[:8]
    seeds = [MixtureSampler(torch.ones(50), batch_size=2, seed=seed) for seed in (7, 8)]
    first, second = ([i for i, _ in zip(s, range(20), strict=False)] for s in seeds)
    assert first != second


def test_bad_step_guard_counts_and_aborts() -> None:
    guard = BadStepGuard(3)
    guard.bad(1, "loss was NaN / inf")
    guard.good()
    guard.bad(5, "loss was NaN / inf")
    guard.bad(6, "loss was NaN / inf")
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row \(steps 5-7, 4 skipped"):
        guard.bad(7, "loss was NaN / inf", "runs/x/checkpoints/step_000004")
    assert exit_code_for("SIGTERM") == 143 and exit_code_for("SIGINT") == 130 and exit_code_for(None) == 0


def test_lr_schedule_shapes() -> None:
    assert lr_factor(0, warmup=4, total=10, kind="cosine") == 0.0
    assert lr_factor(4, warmup=4, total=10, kind="cosine") == 1.0
    assert lr_factor(10, warmup=4, total=10, kind="cosine") == pytest.approx(0.0)
    assert lr_factor(7, warmup=4, total=10, kind="linear") == pytest.approx(0.5)
    assert lr_factor(9, warmup=0, total=10, kind="constant") == 1.0
