"""Shared pieces of the tests that run training under ``accelerate launch`` (and need free ports)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the tiny classic model of the multi-process tests; format with root= (a SynthRef folder) and head=
TINY_CLASSIC_YAML = """
model:
  mode: classic
  text: {{init: random, dim: 16}}
  pixel: {{cnn_widths: [8, 8, 16, 16]}}
  head: {{name: {head}, dim: 16, num_heads: 2}}
data:
  train: [{{name: synthref, root: {root}, split: train}}]
  image_size: 32
train:
  batch_size: 2
  lr: 1.0e-3
  log_every: 1
  tensorboard: false
"""


def free_port() -> int:
    """A localhost TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_env() -> dict[str, str]:
    """The environment of a launched run: one intra-op thread per rank, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch_cmd(accelerate_config: str, *train_args: str, launch_args: Sequence[str] = ()) -> list[str]:
    """``accelerate launch --config_file configs/accelerate/<config> [OPTIONS] -m mllm_ris.cli train ...``.

    ``launch_args`` are the ``OPTIONS``: more ``accelerate launch`` options, which override the
    config file's (e.g. ``--deepspeed_config_file``).
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / accelerate_config),
        "--main_process_port",
        str(free_port()),
        *launch_args,
        "-m",
        "mllm_ris.cli",
        "train",
        *train_args,
    ]
