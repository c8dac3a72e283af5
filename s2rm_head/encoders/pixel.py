"""Pixel encoders: an image batch ``(B, 3, H, W)`` → a 4-level pyramid at strides 4, 8, 16, 32.

Three kinds, one interface (:class:`PixelEncoder`), built from one :class:`PixelEncoderConfig`:

* ``tiny-cnn`` — :class:`TinyCNNEncoder`, a small conv-norm-ReLU CNN for CPU training;
* ``hf-backbone`` — :class:`HFBackboneEncoder`, any ``transformers.AutoBackbone`` with a
  hierarchical stage layout (Swin, ConvNeXt, ResNet: ``stage1..stage4`` are strides 4..32);
* ``sam-vit`` — :class:`SAMViTEncoder`, segment-anything's ``ImageEncoderViT`` (stride 16) followed
  by a ViTDet simple feature pyramid (deconv ×4, deconv ×2, identity, max-pool ×½).

Images arrive already normalised by the caller (each backbone's own mean / std). Weights are read
from local paths only; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from transformers import MODEL_FOR_BACKBONE_MAPPING, AutoBackbone, AutoConfig, PretrainedConfig

from s2rm_head.config import HF_STAGES, PixelEncoderConfig
from s2rm_head.errors import ConfigError, MissingFileError

__all__ = [
    "PYRAMID_STRIDES",
    "HFBackboneEncoder",
    "PixelEncoder",
    "PixelEncoderConfig",
    "SAMViTEncoder",
    "TinyCNNEncoder",
    "build_pixel_encoder",
    "build_sam_vit",
]

PYRAMID_STRIDES: tuple[int, int, int, int] = (4, 8, 16, 32)


class PixelEncoder(nn.Module):
    """Base of every pixel encoder: ``forward(images (B, 3, H, W)) -> [(B, C_i, H/s_i, W/s_i)]``.

    Attributes:
        channels: ``(C_1, C_2, C_3, C_4)`` channels of the four levels.
        strides: ``(4, 8, 16, 32)``.
    """

    channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int] = PYRAMID_STRIDES

    def _check_pyramid(self, feats: list[torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
        """Fail loudly when a backbone does not give 4 levels at strides 4..32 (floor or ceil sizes)."""
        if len(feats) != 4:
            raise ValueError(f"{type(self).__name__}: expected 4 pyramid levels, got {len(feats)}")
        h, w = images.shape[-2:]
        for i, (f, s, c) in enumerate(zip(feats, self.strides, self.channels, strict=True)):
            fh, fw = f.shape[-2:]
            if abs(fh * s - h) >= s or abs(fw * s - w) >= s or f.shape[1] != c:
                raise ValueError(
                    f"{type(self).__name__}: level {i} is {tuple(f.shape)}, expected (B, {c}, ~{h / s:g}, "
                    f"~{w / s:g}) for stride {s} of a {h}x{w} input; the backbone is not a 4..32 pyramid"
                )
        return feats


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(math.gcd(8, channels), channels)


class _ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, norm: str = "bn", act: bool = True) -> None:
        layers = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), _norm(norm, c_out)]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if act else []))


class _BasicBlock(nn.Module):
    """ResNet basic block: ``x + norm(conv(relu(norm(conv(x)))))`` then ReLU; shape preserved."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _ConvNormAct(channels, channels, norm=norm),
            _ConvNormAct(channels, channels, norm=norm, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class TinyCNNEncoder(PixelEncoder):
    """Small CNN for CPU training: a stride-2 stem, then 4 stages that each halve the resolution.

    Args:
        widths: channels of the 4 levels (strides 4, 8, 16, 32).
        blocks: residual basic blocks per stage after its stride-2 conv.
        norm: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm, batch-size independent).
    """

    def __init__(
        self, *, widths: tuple[int, ...] = (16, 32, 64, 128), blocks: int = 1, norm: str = "bn"
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ConfigError(f"widths: needs 4 values, got {tuple(widths)}")
        self.channels = tuple(int(w) for w in widths)  # type: ignore[assignment]
        stem_width = max(widths[0] // 2, 8)
        self.stem = _ConvNormAct(3, stem_width, stride=2, norm=norm)  # stride 2
        stages, c_in = [], stem_width
        for w in self.channels:
            stages.append(
                nn.Sequential(
                    _ConvNormAct(c_in, w, stride=2, norm=norm), *(_BasicBlock(w, norm) for _ in range(blocks))
                )
            )
            c_in = w
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images (B, 3, H, W)`` → 4 maps ``(B, C_i, ⌈H/s_i⌉, ⌈W/s_i⌉)``, ``s_i`` = 4, 8, 16, 32."""
        x = self.stem(images)  # (B, C_stem, H/2, W/2)
        feats = []
        for stage in self.stages:
            x = stage(x)  # halves H and W
            feats.append(x)
        return feats


class _FrozenMixin:
    """Keeps the frozen submodule (attribute ``_frozen_attr``) in eval mode whatever ``train()`` says.

    A frozen backbone must not update BatchNorm statistics or apply dropout while the rest trains.
    """

    _frozen_attr: str
    frozen: bool

    def _freeze(self) -> None:
        module: nn.Module = getattr(self, self._frozen_attr)
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()

    def train(self, mode: bool = True) -> nn.Module:
        super().train(mode)  # type: ignore[misc]
        if self.frozen:
            getattr(self, self._frozen_attr).eval()
        return self


class HFBackboneEncoder(_FrozenMixin, PixelEncoder):
    """Any ``transformers`` backbone whose 4 ``out_features`` are strides 4, 8, 16, 32.

    Swin / ConvNeXt ``stage1`` follows a stride-4 patch embedding; ResNet's ``stage1`` follows its
    stride-4 stem (conv s2 + max-pool s2). Build with :meth:`from_config` (random init) or
    :meth:`from_pretrained` (a local folder written by ``save_pretrained``).

    Args:
        backbone: a ``transformers`` backbone (``BackboneMixin``) returning ``feature_maps``.
        freeze: freeze every backbone weight and keep it in eval mode.
    """

    _frozen_attr = "backbone"

    def __init__(self, backbone: nn.Module, *, freeze: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        channels = tuple(int(c) for c in backbone.channels)
        if len(channels) != 4:
            raise ConfigError(
                f"backbone out_features {backbone.out_features} gives {len(channels)} levels, need 4"
            )
        self.channels = channels  # type: ignore[assignment]
        self.frozen = freeze
        if freeze:
            self._freeze()
        self._probe()

    def _probe(self) -> None:
        """One pass on a 64x64 dummy image: check the strides now (not mid-training), and freeze the
        weights the backbone never uses (e.g. the final LayerNorm of the SwinModel inside SwinBackbone),
        so that the optimiser and DDP only see weights that get gradients."""
        param = next(self.backbone.parameters())
        images = torch.zeros(1, getattr(self.backbone.config, "num_channels", 3), 64, 64).to(param)
        was_training = self.backbone.training
        self.backbone.eval()  # no BatchNorm statistics update
        with torch.enable_grad():
            feats = list(self.backbone(pixel_values=images).feature_maps)
            self._check_pyramid(feats, images)
            params = [p for p in self.backbone.parameters() if p.requires_grad]
            if params:
                grads = torch.autograd.grad(sum(f.sum() for f in feats), params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.requires_grad_(g is not None)
        self.backbone.train(was_training)

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, *, out_features: list[str] | None = None, freeze: bool = False
    ) -> HFBackboneEncoder:
        """Random init from a backbone-capable config (e.g. ``ConvNextConfig(depths=[1, 1, 1, 1])``)."""
        config = copy.deepcopy(config)  # the caller's config is left as it was
        config.out_features = list(out_features or HF_STAGES)  # the setter aligns out_indices
        return cls(AutoBackbone.from_config(config), freeze=freeze)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, out_features: list[str] | None = None, freeze: bool = False
    ) -> HFBackboneEncoder:
        """Load weights from a local folder (config.json + weights); never touches the network."""
        if not (Path(path) / "config.json").is_file():
            raise MissingFileError(f"hf-backbone: no config.json in {str(path)!r} (a local folder is needed)")
        # AutoBackbone.from_pretrained asks the Hub whether ``path`` is a repo (and fails on local
        # folders in transformers 5); resolve the backbone class from the local config instead.
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if type(config) not in MODEL_FOR_BACKBONE_MAPPING:
            raise ConfigError(f"hf-backbone: {config.model_type!r} in {str(path)!r} has no backbone class")
        config.out_features = list(out_features or HF_STAGES)  # the setter aligns out_indices
        backbone_cls = MODEL_FOR_BACKBONE_MAPPING[type(config)]
        backbone = backbone_cls.from_pretrained(str(path), config=config, local_files_only=True)
        return cls(backbone, freeze=freeze)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the backbone (config + safetensors) so :meth:`from_pretrained` reads it back."""
        self.backbone.save_pretrained(str(path))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images (B, 3, H, W)`` → 4 maps ``(B, C_i, ~H/s_i, ~W/s_i)``, ``s_i`` = 4, 8, 16, 32."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = list(self.backbone(pixel_values=images).feature_maps)
        return self._check_pyramid(feats, images)


class SAMViTEncoder(_FrozenMixin, PixelEncoder):
    """SAM's ViT (stride 16) + a ViTDet simple feature pyramid → strides 4, 8, 16, 32.

    The ViT has absolute position embeddings for one input size, so images must already be
    ``(B, 3, img_size, img_size)`` (resize the long side and pad, as ``SamPredictor`` does).

    Args:
        vit: a segment-anything ``ImageEncoderViT`` (patch size 16).
        pyramid_channels: channels of every output level.
        freeze_vit: freeze the ViT (no grad, eval mode); the pyramid always trains.
    """

    _frozen_attr = "vit"

    def __init__(self, *, vit: ImageEncoderViT, pyramid_channels: int = 256, freeze_vit: bool = True) -> None:
        super().__init__()
        if tuple(vit.patch_embed.proj.stride) != (16, 16):
            raise ConfigError(f"vit: patch stride {tuple(vit.patch_embed.proj.stride)}, the pyramid needs 16")
        self.vit = vit
        self.img_size = int(vit.img_size)
        c_vit = vit.neck[-1].weight.shape[0]  # out_chans of SAM's neck (its last LayerNorm2d)
        c = pyramid_channels
        self.channels = (c, c, c, c)
        half = max(c_vit // 2, 1)
        # ViTDet: scale ×4 (two deconvs), ×2 (one deconv), ×1 (identity), ×½ (max-pool).
        self.rescale = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(c_vit, half, 2, stride=2),
                    LayerNorm2d(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, half, 2, stride=2),
                ),
                nn.ConvTranspose2d(c_vit, c_vit, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ]
        )
        in_chans = [half, c_vit, c_vit, c_vit]
        self.output = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(ci, c, 1, bias=False),
                LayerNorm2d(c),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                LayerNorm2d(c),
            )
            for ci in in_chans
        )
        self.frozen = freeze_vit
        if freeze_vit:
            self._freeze()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images (B, 3, S, S)`` with ``S = img_size`` → 4 maps ``(B, C, S/s_i, S/s_i)``."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.img_size, self.img_size):
            raise ValueError(
                f"SAMViTEncoder: images are {tuple(images.shape)}, expected (B, 3, {self.img_size}, "
                f"{self.img_size}) (img_size={self.img_size}); resize and pad before encoding"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self.vit(images)  # (B, out_chans, S/16, S/16)
        return self._check_pyramid(self.pyramid(x), images)

    def pyramid(self, embed: torch.Tensor) -> list[torch.Tensor]:
        """The simple feature pyramid over ViT output ``(B, out_chans, S/16, S/16)`` → 4 maps, strides 4–32.

        Public so a model that already ran the same ViT (SAM's image encoder) reuses its output.
        """
        return [out(rescale(embed)) for rescale, out in zip(self.rescale, self.output, strict=True)]


def _load_sam_vit_weights(vit: ImageEncoderViT, path: str) -> None:
    """Load ``image_encoder.*`` (or bare ViT) weights from a SAM ``.pth`` / ``.safetensors`` file."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"sam-vit: checkpoint {path!r} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    prefix = "image_encoder."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        result = vit.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches (a different ViT size)
        raise ConfigError(f"sam-vit: checkpoint {path!r} does not fit the ViT config: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"sam-vit: checkpoint {path!r} does not fit the ViT config: "
            f"missing {len(result.missing_keys)} keys {result.missing_keys[:3]}, "
            f"unexpected {len(result.unexpected_keys)} {result.unexpected_keys[:3]}"
        )


def build_sam_vit(cfg: PixelEncoderConfig) -> ImageEncoderViT:
    """SAM's ``ImageEncoderViT`` with the settings of ``segment_anything.build_sam`` and ``cfg``'s sizes."""
    return ImageEncoderViT(
        img_size=cfg.sam_img_size,
        patch_size=16,  # every SAM checkpoint; the simple feature pyramid assumes stride 16
        embed_dim=cfg.sam_embed_dim,
        depth=cfg.sam_depth,
        num_heads=cfg.sam_num_heads,
        mlp_ratio=4.0,
        out_chans=cfg.sam_out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.sam_window_size,
        global_attn_indexes=tuple(cfg.sam_global_attn_indexes),
    )


def build_pixel_encoder(cfg: PixelEncoderConfig) -> PixelEncoder:
    """Build the encoder ``cfg.name`` names; weights come from ``cfg.path`` when it is set."""
    if cfg.name == "tiny-cnn":
        return TinyCNNEncoder(widths=tuple(cfg.cnn_widths), blocks=cfg.cnn_blocks, norm=cfg.cnn_norm)
    if cfg.name == "hf-backbone":
        if cfg.path is not None:
            return HFBackboneEncoder.from_pretrained(
                cfg.path, out_features=cfg.hf_out_features, freeze=cfg.hf_freeze
            )
        config = AutoConfig.for_model(cfg.hf_model_type, **json.loads(cfg.hf_config_json))
        return HFBackboneEncoder.from_config(config, out_features=cfg.hf_out_features, freeze=cfg.hf_freeze)
    vit = build_sam_vit(cfg)
    if cfg.path is not None:
        _load_sam_vit_weights(vit, cfg.path)
    return SAMViTEncoder(vit=vit, pyramid_channels=cfg.sam_pyramid_channels, freeze_vit=cfg.sam_freeze_vit)
