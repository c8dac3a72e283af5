"""The one check every safetensors loader of ours runs before ``load_state_dict``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm_ris.errors import CheckpointError

__all__ = ["check_state_fits", "read_safetensors"]


def check_state_fits(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, name: str
) -> None:
    """Refuse ``state`` unless it has exactly ``expected``'s keys, each with the same shape.

    Args:
        name: how messages name the file, e.g. ``"checkpoint runs/x/model.safetensors"``.

    Raises:
        CheckpointError: one line naming ``name`` and the missing / unexpected keys or the first
            mis-shaped tensor.
    """
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            want = tuple(expected[key].shape)
            raise CheckpointError(f"{name}: {key} has shape {tuple(value.shape)}, the model {want}")


def read_safetensors(file: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors ``file``; ``name`` says which file in the one-line errors.

    Raises:
        CheckpointError: ``cannot read {name}: ...`` for a truncated or foreign file.
    """
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises several types for truncated / foreign files
        raise CheckpointError(f"cannot read {name}: {str(exc).splitlines()[0]}") from None
