"""SAM checkpoints in the official layout (``sam_vit_b_01ec64.pth``: exactly ``Sam.state_dict()``).

Read with ``torch.load(weights_only=True)`` or safetensors; every failure is a one-line
:class:`~s2rm_head.errors.CheckpointError` naming the file. Writes are atomic (temporary file, rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from s2rm_head.config import SAM_ARCHS, SAMArch
from s2rm_head.errors import CheckpointError

__all__ = [
    "SAM_ARCHS",
    "SAMArch",
    "SAMLoadReport",
    "infer_sam_arch",
    "load_sam_checkpoint",
    "save_sam_checkpoint",
]


@dataclass
class SAMLoadReport:
    """What :func:`load_sam_checkpoint` did: the file and the keys that did not match (none when strict)."""

    path: str
    missing_keys: list[str]
    unexpected_keys: list[str]


def infer_sam_arch(state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """``(ViT blocks, ViT width)`` of a SAM state dict, ``None`` without ``image_encoder`` keys."""
    prefix = "image_encoder.blocks."
    blocks = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return None
    return len(blocks), int(weight.shape[0])  # patch embedding (width, 3, 16, 16)


def _describe(arch: tuple[int, int]) -> str:
    for name, a in SAM_ARCHS.items():
        if (a.depth, a.embed_dim) == arch:
            return f"a {name} ({arch[0]} blocks, width {arch[1]})"
    return f"a non-official ({arch[0]} blocks, width {arch[1]})"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, safetensors header errors, ...
        raise CheckpointError(f"cannot read SAM checkpoint {path} ({_one_line(exc)})") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("model", "state_dict"):  # a training checkpoint wrapping the state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"SAM checkpoint {path} is not a state dict of tensors (got {type(state).__name__})"
        )
    return state


def load_sam_checkpoint(sam: Sam, path: str | Path, *, strict: bool = True) -> SAMLoadReport:
    """Load an official-layout SAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(map_location="cpu", weights_only=True)``.

    Raises:
        CheckpointError: missing / unreadable file, not a state dict, another ViT size than ``sam``'s
            ("looks like a vit_l checkpoint but the model is a vit_b"), a shape mismatch, or (``strict``)
            missing / unexpected keys. The message is one line and names the file.
    """
    path = Path(path)
    state = _read_state(path)
    own = sam.state_dict()
    found, want = infer_sam_arch(state), infer_sam_arch(own)
    if found is not None and want is not None and found != want:
        raise CheckpointError(
            f"SAM checkpoint {path} looks like {_describe(found)} checkpoint but the model is "
            f"{_describe(want)}; set sam.variant to match the file"
        )
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            hint = ""
            if key == "image_encoder.pos_embed":  # (1, S/16, S/16, width)
                hint = f" (made for img_size {value.shape[1] * 16}, the model has {own[key].shape[1] * 16})"
            raise CheckpointError(
                f"SAM checkpoint {path}: {key} has shape {tuple(value.shape)}, "
                f"the model {tuple(own[key].shape)}{hint}"
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"SAM checkpoint {path} does not fit the model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    sam.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return SAMLoadReport(path=str(path), missing_keys=missing, unexpected_keys=unexpected)


def save_sam_checkpoint(sam: Sam, path: str | Path) -> Path:
    """Write ``sam.state_dict()`` in the official layout (``torch.save``, or safetensors by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in sam.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    else:
        torch.save(state, str(tmp))
    tmp.replace(path)
    return path
