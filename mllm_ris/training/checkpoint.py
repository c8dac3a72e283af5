"""Training checkpoints on disk: atomic writes, a ``latest`` pointer, keep-last-N, resume lookup.

Layout under ``train.output_dir``::

    checkpoints/
      step_000500/            a complete checkpoint (only ever created by a rename)
        model.safetensors     accelerate's model state (DeepSpeed: pytorch_model/ shards instead)
        optimizer.bin         (DeepSpeed keeps the optimizer inside pytorch_model/)
        custom_checkpoint_0.pkl   LR scheduler
        random_states_<rank>.pkl  python / numpy / torch RNG of every rank
        trainer_state.json    step, stream position, bad-step counts, world size
        config.json           the resolved config
      step_001000.tmp/        being written (or left by a crash: ignored, removed later)
      latest                  "step_000500": written (atomically) after the rename

A checkpoint is written into ``step_N.tmp/`` by every rank, then the main process renames it to
``step_N/`` (``os.replace`` of a directory is atomic on POSIX) and rewrites ``latest``. A crash
at any moment therefore leaves every ``step_N/`` complete; ``--resume auto`` picks the newest.
This module does the file operations; :mod:`mllm_ris.training.trainer` adds the barriers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mllm_ris.errors import CheckpointError

__all__ = [
    "CheckpointManager",
    "TrainerState",
    "check_external_only_missing",
    "checkpoint_name",
    "consolidated_state_dict",
    "read_trainer_state",
    "resolve_start",
    "saved_keys",
]

STATE_FILE = "trainer_state.json"
LATEST = "latest"
DEEPSPEED_TAG = "pytorch_model"  # the checkpoint tag accelerate gives DeepSpeed's save_checkpoint
_COMPLETE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """The trainer's own counters (accelerate saves model, optimizer, scheduler and RNG).

    Attributes:
        step: optimizer steps done (skipped bad steps included).
        samples: position in the global sample stream (samples consumed by all ranks).
        bad_steps: steps skipped for a non-finite loss / gradient norm, in total.
        consecutive_bad: of which at the end, in a row.
        world_size, batch_size, grad_accum_steps, seed: how the stream was consumed.
    """

    step: int = 0
    samples: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0
    world_size: int = 1
    batch_size: int = 1
    grad_accum_steps: int = 1
    seed: int = 0


def checkpoint_name(step: int) -> str:
    """``step_000500`` (zero-padded so names sort; longer runs simply get more digits)."""
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_trainer_state(checkpoint: str | Path) -> TrainerState:
    """The :class:`TrainerState` of a checkpoint directory.

    Raises:
        CheckpointError: not a complete checkpoint (no readable ``trainer_state.json``).
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"not a complete training checkpoint: cannot read {path} ({exc})") from None
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in data.items() if k in known})


class CheckpointManager:
    """File operations on ``output_dir/checkpoints`` (call them on the main process only).

    Args:
        output_dir: the run folder.
        keep_last: complete checkpoints to keep (older ones are deleted after each save).
    """

    def __init__(self, output_dir: str | Path, *, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _COMPLETE.match(child.name)
            if match and child.is_dir() and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (by step; the ``latest`` pointer names the same one)."""
        found = self.complete()
        return found[-1][1] if found else None

    def begin(self, step: int) -> Path:
        """Create (empty) ``step_N.tmp/`` for every rank to write into."""
        tmp = self.root / f"{checkpoint_name(step)}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, tmp: Path, state: TrainerState, config: dict | None = None) -> Path:
        """Write ``trainer_state.json`` into ``tmp``, rename it ``step_N/``, point ``latest`` at it, prune."""
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_atomic(tmp / STATE_FILE, json.dumps(asdict(state), indent=2))
        final = self.root / checkpoint_name(step)
        if final.exists():  # same step written again (e.g. resumed and stopped at once)
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name + "\n")
        self.prune(keep=final)
        return final

    def prune(self, *, keep: Path | None = None) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints (never ``keep``)."""
        found = [path for _, path in self.complete()]
        removed = [path for path in found[: max(0, len(found) - self.keep_last)] if path != keep]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def clean_partial(self) -> list[Path]:
        """Delete ``*.tmp`` / ``*.old`` leftovers of interrupted writes."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.is_dir() and p.suffix in (".tmp", ".old")]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale


def saved_keys(checkpoint: str | Path) -> set[str]:
    """The model keys in a checkpoint's ``model.safetensors`` (its header only; a DDP ``module.``
    prefix removed).

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    from safetensors import safe_open

    path = Path(checkpoint) / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix("module.") for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # safetensors raises several types for missing / truncated files
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def check_external_only_missing(
    checkpoint: str | Path, model: torch.nn.Module, external: frozenset[str]
) -> None:
    """Before a non-strict load: the checkpoint's ``model.safetensors`` may lack only ``external`` keys.

    Raises:
        CheckpointError: other keys are missing or unexpected (the message counts and names a few).
    """
    path = Path(checkpoint) / "model.safetensors"
    saved = saved_keys(checkpoint)
    expected = set(model.state_dict())
    missing = sorted(expected - saved - external)
    unexpected = sorted(saved - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def consolidated_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a checkpoint, whatever wrote it.

    DeepSpeed ZeRO shards (``pytorch_model/``) are merged with DeepSpeed's own
    ``get_fp32_state_dict_from_zero_checkpoint``; accelerate's ``model.safetensors`` is read as
    is. A DDP ``module.`` prefix is removed, so the keys fit the bare model.

    Raises:
        CheckpointError: neither layout is present or the files cannot be read.
    """
    path = Path(checkpoint)
    if (path / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
        except Exception as exc:  # DeepSpeed raises several types for missing / foreign shards
            raise CheckpointError(f"cannot merge the DeepSpeed checkpoint {path}: {exc}") from None
    elif (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / "model.safetensors"))
        except Exception as exc:  # safetensors raises several types for truncated files
            raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {exc}") from None
    else:
        raise CheckpointError(f"{path}: neither model.safetensors nor a DeepSpeed {DEEPSPEED_TAG}/ folder")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resolve_start(resume: str | None, manager: CheckpointManager | None, *, overwrite: bool) -> str | None:
    """Where a run starts: a checkpoint directory, or None for a fresh start (main process only).

    ``resume``: None (fresh), ``"auto"`` (the newest complete checkpoint, or fresh if none) or a
    checkpoint directory. Leftover ``*.tmp`` directories are removed. A fresh start in a folder
    with checkpoints, or a resume from a checkpoint older than the folder's newest, would mix two
    runs: refused unless ``overwrite`` (then the other checkpoints are deleted).

    Raises:
        CheckpointError: the checkpoint is incomplete, or the folder holds another run.
    """
    if resume == "auto" and manager is None:
        raise CheckpointError("train.resume=auto needs train.output_dir")
    if resume not in (None, "auto"):
        read_trainer_state(resume)  # raises unless complete
    if manager is None:
        return resume
    manager.clean_partial()
    existing = manager.complete()
    if resume == "auto":
        return str(existing[-1][1]) if existing else None
    if resume is None:
        doomed = [path for _, path in existing]
    else:
        inside = Path(resume).resolve().parent == manager.root.resolve()
        step = read_trainer_state(resume).step
        doomed = [path for s, path in existing if not inside or s > step]
    if doomed and not overwrite:
        what = "checkpoints" if resume is None else f"checkpoints of another run or newer than {resume}"
        raise CheckpointError(
            f"{manager.root.parent} already holds {what} ({doomed[-1].name}); pass --resume auto to "
            "continue the newest, set train.overwrite_output_dir=true to replace them, or choose "
            "another train.output_dir"
        )
    for path in doomed:
        shutil.rmtree(path)
    if doomed and resume is None:
        shutil.rmtree(manager.root.parent / "tensorboard", ignore_errors=True)
    return resume
