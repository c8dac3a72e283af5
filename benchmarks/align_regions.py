"""Align the region encoder with the LLM's word embeddings before grounding training (an experiment).

LLaVA's first stage trains the projector so that image tokens land where the LLM's words are. Here,
cheaply, without running the LLM: each superpixel region lying >= 50 % inside an object of a
SynthRef training scene gets that object's caption ("red circle"; "background" otherwise), and the
region encoder (``projector.desc_mlp``) learns to output the mean input embedding of the caption's
tokens (MSE, plus a cross-entropy over the cosine similarities to all captions, so that they stay
apart). Nothing else changes. The result is a model folder to start a run from
(``model.checkpoint=OUT``). It prints how often a val region's token is nearest to its own caption.

    python benchmarks/align_regions.py --data data/synthref_s11_20k --out runs/aligned \\
        --model configs/model/smollm2-135m.yaml --model configs/model/tiny-synth-pointer.yaml \\
        --set model.mllm.keep_layers=4 --set model.mllm.reject_from=pointer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ROOT
from pycocotools import mask as mask_utils

from mllm_ris.config import config_to_dict, load_config
from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.losses import region_coverage
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.predictor import build_processor
from mllm_ris.modeling.projector import descriptor_features
from mllm_ris.training.ris_task import write_model_folder

BACKGROUND = "background"


def object_captions(root: Path) -> dict[int, list[tuple[str, dict]]]:
    """``image id -> [(caption, RLE)]`` from a SynthRef build's ``synthref/instances.json``, in
    drawing order (a later object's caption wins where regions overlap)."""
    inst = json.loads((root / "synthref" / "instances.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in inst["images"]}
    names = {c["id"]: c["name"] for c in inst["categories"]}
    out: dict[int, list[tuple[str, dict]]] = {}
    for a in sorted(inst["annotations"], key=lambda a: (a["image_id"], a.get("draw_order", 0))):
        attrs = a.get("attributes") or {}
        text = f"{attrs.get('colour', '')} {attrs.get('shape', '')}".strip() or names[a["category_id"]]
        h, w = sizes[a["image_id"]]
        seg = a["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        out.setdefault(a["image_id"], []).append((text, rle))
    return out


def region_examples(
    model: RISModel, root: Path, split: str, images: int, image_size: int
) -> tuple[torch.Tensor, list[str]]:
    """Descriptor features ``(N, F)`` of the regions of the first ``images`` scenes of ``split`` and
    each region's caption (``N`` strings)."""
    captions = object_captions(root)
    dataset = build_dataset("synthref", root, split)
    collate = build_processor(model, image_size=image_size)
    feats: list[torch.Tensor] = []
    texts: list[str] = []
    seen: set = set()
    for i in range(len(dataset)):
        if len(seen) >= images:
            break
        sample = dataset[i]
        if sample.image_id in seen:
            continue
        seen.add(sample.image_id)
        batch = collate([sample])
        assert batch.superpixels is not None and batch.regions is not None
        labels = model.projector.region_labels(batch.superpixels)[0]  # (S, S) token order, -1 = none
        k = batch.regions.shape.shape[1]
        x = descriptor_features(batch.regions, k, torch.float32)[0]  # (K, F)
        objects = captions[int(sample.image_id)]
        masks = torch.stack([torch.from_numpy(mask_utils.decode(rle)) for _, rle in objects])  # (T, H, W)
        if masks.shape[-2:] != labels.shape:  # letterboxed canvas of another size: not SynthRef's 128 px
            raise SystemExit(
                f"--data: scenes of {tuple(masks.shape[-2:])} px; use --image-size {masks.shape[-1]}"
            )
        inside = region_coverage(labels[None], masks[None].float(), k)[0] >= 0.5  # (T, K)
        region_text = [BACKGROUND] * k
        for (text, _), regions in zip(objects, inside, strict=True):  # drawing order: the last one wins
            for r in regions.nonzero().flatten().tolist():
                region_text[r] = text
        feats.append(x)
        texts.extend(region_text)
    return torch.cat(feats), texts


def caption_embeddings(model: RISModel, captions: list[str]) -> torch.Tensor:
    """``(C, D)`` the mean input embedding of each caption's tokens (with a leading space)."""
    assert model.mllm is not None
    table = model.mllm.llm.get_input_embeddings()
    weight = getattr(table, "weight", None)
    if weight is None:  # peft's trainable-token wrapper
        weight = table.base_layer.weight
    tok = model.mllm.tokenizer
    rows = [weight[tok(" " + c, add_special_tokens=False)["input_ids"]].mean(0) for c in captions]
    return torch.stack(rows).detach().float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--model", type=Path, action="append", help="model config files, merged in order")
    parser.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    parser.add_argument("--images", type=int, default=4000, help="training scenes")
    parser.add_argument("--val-images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    files = args.model or [
        ROOT / "configs/model/smollm2-135m.yaml",
        ROOT / "configs/model/tiny-synth-pointer.yaml",
    ]
    cfg = load_config(files, args.set)
    if (
        cfg.model.mode != "mllm"
        or cfg.model.projector.kind != "superpixel"
        or not cfg.model.projector.descriptors
    ):
        raise SystemExit("--model: an mllm model with the superpixel projector and region descriptors")
    torch.manual_seed(args.seed)
    model = build_model(cfg.model)
    start = time.perf_counter()
    x, texts = region_examples(model, args.data, "train", args.images, args.image_size)
    x_val, texts_val = region_examples(model, args.data, "val", args.val_images, args.image_size)
    captions = sorted(set(texts) | set(texts_val))
    index = {c: i for i, c in enumerate(captions)}
    y = torch.tensor([index[t] for t in texts])
    y_val = torch.tensor([index[t] for t in texts_val])
    targets = caption_embeddings(model, captions)  # (C, D)
    unit = F.normalize(targets, dim=1)
    spent = time.perf_counter() - start
    print(f"{len(y)} train / {len(y_val)} val regions, {len(captions)} captions, {spent:.0f} s")
    mlp = model.projector.desc_mlp
    assert mlp is not None
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-3)

    def nearest_caption() -> dict[str, float]:
        with torch.no_grad():
            pred = (F.normalize(mlp(x_val), dim=1) @ unit.T).argmax(1)
        objects = y_val != index.get(BACKGROUND, -1)
        return {
            "all": round(float((pred == y_val).float().mean()), 4),
            "objects": round(float((pred[objects] == y_val[objects]).float().mean()), 4),
        }

    before = nearest_caption()
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(y)).split(512):
            out = mlp(x[idx])
            ce = F.cross_entropy(F.normalize(out, dim=1) @ unit.T / 0.05, y[idx])
            loss = 10.0 * F.mse_loss(out, targets[y[idx]]) + ce
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}: val regions nearest to their caption {nearest_caption()}", flush=True)
    after = nearest_caption()
    tree = {"model": config_to_dict(cfg.model), "data": {"image_size": args.image_size}}
    write_model_folder(model, args.out, tree)
    record = {"before": before, "after": after, "captions": len(captions), "regions": len(y)}
    (Path(args.out) / "alignment.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
