"""Images are normalised once, by the part that reads them: the batch carries the letterbox as [0, 1] RGB
(padding = the ImageNet mean colour) and the pixel encoder, the vision tower and SAM normalise it with
their own statistics. Before, the collator ImageNet-normalised the batch and the model un-normalised it
for the tower and SAM; a model must give the same outputs from the same samples either way.

``RECORDED`` holds the outputs of tiny seeded models computed by the earlier code (commit efecb28,
where ``RISTransform`` normalised and ``RISModel`` un-normalised): a vision tower + SAM mllm model with
region descriptors, a tiny-CNN + SAM classic model, and a classic model whose pixel encoder shares SAM's
ViT. Each entry: ``[sum, sum of |x|, sum of 7 strided entries]``.
"""

from __future__ import annotations

import pytest
import torch
from test_model_kit import SIZE, TEMPLATE, synth_samples, tiny_cfg

from mllm_ris.modeling.model import build_model
from mllm_ris.modeling.predictor import build_processor
from mllm_ris.processing.processor import IMAGENET_MEAN, IMAGENET_STD

SAM_VIT = [
    "model.pixel.name=sam-vit",
    "model.pixel.sam_img_size=64",
    "model.pixel.sam_embed_dim=32",
    "model.pixel.sam_depth=1",
    "model.pixel.sam_num_heads=2",
    "model.pixel.sam_global_attn_indexes=[0]",
    "model.pixel.sam_out_chans=16",
    "model.pixel.sam_pyramid_channels=16",
]
CASES = {
    "mllm_tower_auto": ("mllm", "auto", "model.projector.descriptors=true", "model.mllm.pointer_dim=16"),
    "classic_auto": ("classic", "auto"),
    "classic_samvit_shared": ("classic", "sam", *SAM_VIT),
}
RECORDED = {
    # re-recorded when the head started refining the mask output mode prior shows (each query's best
    # region at least painted) instead of the raw prior; with the raw prior the old values still hold
    "mllm_tower_auto": {
        "loss": 11.487702,
        "masks": [35.893085, 793.23938, -0.08528],
        "mask_logits": [-2367.142334, 2407.377441, -6.544272],
        "iou": [-0.321555, 0.321555, -0.321555],
        "sam": [-498.982117, 907.051697, -0.136492],
    },
    "classic_auto": {
        "loss": 2.944179,
        "masks": [-2574.692139, 2978.360596, -1.47428],
        "mask_logits": [-160.918274, 212.323944, -2.642558],
        "iou": [0.087184, 0.087184, 0.087184],
        "sam": [-220.473877, 387.47876, -0.21206],
    },
    "classic_samvit_shared": {
        "loss": 3.108836,
        "masks": [-321.019714, 443.276123, -0.259512],
        "mask_logits": [154.56665, 264.250244, 0.928358],
        "iou": [0.342873, 0.342873, 0.342873],
        "sam": [-321.019714, 443.276123, -0.259512],
    },
}


def _stats(t: torch.Tensor) -> list[float]:
    t = t.detach().float()
    return [float(t.sum()), float(t.abs().sum()), float(t.flatten()[:: max(1, t.numel() // 7)][:7].sum())]


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_the_earlier_normalise_then_unnormalise_path(name: str) -> None:
    mode, output_mode, *extra = CASES[name]
    torch.manual_seed(0)
    model = build_model(tiny_cfg(mode, output_mode, *extra)).eval()
    assert model.vision is not None or mode == "classic"
    assert model.share_sam_vit == (name == "classic_samvit_shared")
    batch = build_processor(model, image_size=SIZE, template=TEMPLATE)(synth_samples())
    assert batch.images.min() >= 0 and batch.images.max() <= 1  # the batch is not normalised
    with torch.no_grad():
        out = model(batch)
    got = {"loss": float(out.loss), "masks": _stats(out.masks), "mask_logits": _stats(out.mask_logits)}
    got |= {"iou": _stats(out.iou_pred), "sam": _stats(out.sam_logits)}
    want = RECORDED[name]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-3), key


def test_pixel_encoder_reads_exactly_the_earlier_normalised_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pixel encoder's input is bit for bit the batch the earlier collator made: padding 0."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("classic", "direct")).eval()
    batch = build_processor(model, image_size=SIZE)(synth_samples())
    seen: list[torch.Tensor] = []
    original = model.pixel_encoder.forward
    monkeypatch.setattr(model.pixel_encoder, "forward", lambda x: seen.append(x) or original(x))
    with torch.no_grad():
        model.generate(batch)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(seen[0], (batch.images - mean) / std)
    assert seen[0][~batch.valid[:, None].expand_as(seen[0])].abs().max() == 0  # the padding
