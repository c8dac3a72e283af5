"""Vision tower: any HF vision transformer (CLIP / SigLIP / ViT vision) → patch features ``(B, N, Cv)``.

The tower returns the hidden states of one encoder layer (``feature_layer``, ``-2`` as in LLaVA)
without prefix tokens (CLS, registers), so ``N = h * w`` is the patch grid the projectors pool.
Weights come from a local folder (``config.json`` + weights, read with ``local_files_only``) or,
when no folder is named, a tiny randomly initialised ``ViTConfig`` (128 px, patch 4: a 32 x 32 grid
of 1024 patch tokens). Image mean / std are read from the folder's ``preprocessor_config.json``
when it has one, else taken from the model family's HF default; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.model_config import VisionTowerConfig
from mllm_ris.processing.regions import LruMemo, digest

__all__ = ["VisionTower", "VisionTowerConfig", "build_vision_tower", "default_image_stats"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# HF image-processor defaults per model family (used when a folder has no preprocessor_config.json)
_FAMILY_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (_CLIP_MEAN, _CLIP_STD),
    "clip_vision_model": (_CLIP_MEAN, _CLIP_STD),
    "siglip": (_HALF, _HALF),
    "siglip_vision_model": (_HALF, _HALF),
    "vit": (_HALF, _HALF),
}


def default_image_stats(
    config: PretrainedConfig, folder: str | Path | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the model: ``folder/preprocessor_config.json`` if present, else the family default.

    The JSON is read directly (``image_mean`` / ``image_std``) rather than through
    ``AutoImageProcessor``: only the two vectors are needed, and no processor class is required.
    """
    if folder is not None:
        file = Path(folder) / "preprocessor_config.json"
        if file.is_file():
            data = json.loads(file.read_text())
            if "image_mean" in data and "image_std" in data:
                return tuple(float(v) for v in data["image_mean"]), tuple(float(v) for v in data["image_std"])
    return _FAMILY_STATS.get(str(config.model_type), (_IMAGENET_MEAN, _IMAGENET_STD))


class VisionTower(nn.Module):
    """An HF vision encoder reduced to "image → patch features of one layer".

    Args:
        model: an HF vision model (``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel``…) that
            accepts ``pixel_values`` and returns ``hidden_states`` with ``output_hidden_states=True``.
        feature_layer: index into ``hidden_states`` (0 = embeddings, ``-1`` = last layer).
        freeze: freeze every weight and keep the model in eval mode whatever ``train()`` says.
        image_mean, image_std: per-channel statistics of :meth:`normalize`.

    Attributes:
        image_size: input side ``S``; ``grid``: ``(h, w) = (S / p, S / p)``; ``dim``: ``Cv``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        feature_layer: int = -2,
        freeze: bool = True,
        image_mean: tuple[float, ...] = _IMAGENET_MEAN,
        image_std: tuple[float, ...] = _IMAGENET_STD,
        feature_memo_mb: float = 0.0,
    ) -> None:
        super().__init__()
        if feature_memo_mb and not freeze:
            raise ConfigError("feature_memo_mb: needs freeze (a trained tower's features change)")
        cfg = model.config
        for name in ("image_size", "patch_size", "hidden_size"):
            if not isinstance(getattr(cfg, name, None), int):
                raise ConfigError(
                    f"vision tower: {type(cfg).__name__} has no integer {name}; not a ViT-like model"
                )
        if not isinstance(feature_layer, int):
            raise ConfigError(f"feature_layer: one int expected, got {feature_layer!r}")
        self.model = model
        self.feature_layer = feature_layer
        self.image_size = int(cfg.image_size)
        side = self.image_size // int(cfg.patch_size)
        self.grid: tuple[int, int] = (side, side)
        self.dim = int(cfg.hidden_size)
        self.frozen = freeze
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        # pixels' digest -> (h*w, Cv) features, bounded in bytes
        self._memo: LruMemo[torch.Tensor] = LruMemo(
            feature_memo_mb * 2**20, lambda f: f.numel() * f.element_size()
        )
        if freeze:
            model.requires_grad_(False)
        else:
            self._freeze_unused()
        self.train(self.training)
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.clear_memo())

    def clear_memo(self) -> None:
        """Forget the memoised features (done on every state-dict load)."""
        self._memo.clear()

    @property
    def num_patches(self) -> int:
        """``N = h * w``."""
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen tower never applies dropout
        return self

    def _freeze_unused(self) -> None:
        """Freeze weights the chosen layer never uses (later layers, final norm, pooler) so that the
        optimiser and DDP only see weights that get gradients."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        probe = torch.zeros(1, 3, self.image_size, self.image_size).to(params[0])
        with torch.enable_grad():
            grads = torch.autograd.grad(self(probe).sum(), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g is not None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values (B, 3, S, S)`` normalised → patch features ``(B, h * w, Cv)`` in row-major order.

        With a feature memo (``feature_memo_mb``), images whose exact pixels were seen before reuse their
        features and only the others go through the model."""
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"vision tower: pixel_values {tuple(pixel_values.shape)}, expected "
                f"(B, 3, {self.image_size}, {self.image_size}); resize with preprocess() first"
            )
        if not self._memo.capacity or not len(pixel_values):
            return self._features(pixel_values)
        keys = [digest(x.detach().cpu().numpy()) for x in pixel_values]
        found = {k: v for k in keys if (v := self._memo.get(k)) is not None}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            fresh = self._features(pixel_values[missing])  # (M, h*w, Cv)
            for i, f in zip(missing, fresh, strict=True):
                found[keys[i]] = f.detach().clone()  # a copy: not a view of the batch
                self._memo.put(keys[i], found[keys[i]])
        return torch.stack([found[k] for k in keys]).to(pixel_values.device)  # (B, h*w, Cv)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's patch features ``(B, h * w, Cv)`` of ``pixel_values (B, 3, S, S)``."""
        param = next(self.model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(pixel_values=pixel_values.to(param.dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]  # (B, prefix + h*w, Cv)
        prefix = hidden.shape[1] - self.num_patches
        if prefix < 0:
            raise ValueError(f"vision tower: {hidden.shape[1]} tokens, fewer than the {self.grid} grid")
        return hidden[:, prefix:]  # drop CLS / register tokens → (B, h*w, Cv)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, S, S)`` in [0, 1] → ``(images - mean) / std``."""
        return (images - self.image_mean.to(images)) / self.image_std.to(images)

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Resize (bilinear, antialiased) to ``S x S`` and normalise.

        Args:
            images: ``(B, H, W, 3)`` / ``(H, W, 3)`` uint8, or ``(B, 3, H, W)`` float in [0, 1].

        Returns:
            ``(B, 3, S, S)`` float32 on the tower's device.
        """
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            x = x[None] if x.dim() == 3 else x
            x = x.permute(0, 3, 1, 2).float() / 255.0  # (B, H, W, 3) → (B, 3, H, W) in [0, 1]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"preprocess: expected (B, H, W, 3) uint8 or (B, 3, H, W) float, got {tuple(x.shape)}"
            )
        x = x.to(self.image_mean.device, torch.float32)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.normalize(x)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the HF model (config + safetensors) and its mean / std for :func:`build_vision_tower`."""
        self.model.save_pretrained(str(path))
        stats = {
            "image_mean": self.image_mean.flatten().tolist(),
            "image_std": self.image_std.flatten().tolist(),
        }
        (Path(path) / "preprocessor_config.json").write_text(json.dumps(stats, indent=2))


def _load_vision_model(path: Path) -> tuple[PreTrainedModel, PretrainedConfig]:
    """A vision-only model from ``path``; from a composite folder (full CLIP / SigLIP) its vision half."""
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        return AutoModel.from_pretrained(str(path), local_files_only=True), config
    if type(vision_config) not in MODEL_MAPPING:
        raise ConfigError(f"vision tower: no model class for {vision_config.model_type!r} in {str(path)!r}")
    # e.g. CLIPVisionModel from a CLIPModel folder: keys ``vision_model.*`` match, text weights are skipped
    model_cls = MODEL_MAPPING[type(vision_config)]
    return model_cls.from_pretrained(str(path), config=vision_config, local_files_only=True), config


def build_vision_tower(cfg: VisionTowerConfig) -> VisionTower:
    """Load the tower ``cfg`` names (local files only) or build the tiny random ViT."""
    if cfg.name_or_path is None:
        model = AutoModel.from_config(cfg.tiny_config())
        mean, std = default_image_stats(model.config)
    else:
        path = Path(cfg.name_or_path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"name_or_path: no config.json in {str(path)!r} (a local model folder is needed)"
            )
        model, config = _load_vision_model(path)
        mean, std = default_image_stats(config, path)
    return VisionTower(
        model,
        feature_layer=cfg.feature_layer,
        freeze=cfg.freeze,
        image_mean=mean,
        image_std=std,
        feature_memo_mb=cfg.feature_memo_mb,
    )
