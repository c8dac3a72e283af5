"""Draw docs/img/default_model_demo.png: one bundled scene asked about each of its objects in turn.

For every object of the scene one SynthRef expression that names it alone (the first SynthRef made,
:func:`~mllm_ris.inference.scenes.scene_references`) plus the scene's negative query; each
panel shows the model's mask over the image, the query and whether the mask overlaps its own
target best ([right]) or another object ([wrong]). What a user sees in their first minute with the model.

python scripts/make_demo_figure.py [--model DIR] [--scene scene_1] [--out docs/img/default_model_demo.png]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mllm_ris.inference.pipeline import RISPipeline, load_image
from mllm_ris.inference.results import overlay
from mllm_ris.inference.scenes import bundled_scenes, scene_references

ROOT = Path(__file__).resolve().parents[1]
SCALE = 2  # panels at 2x the 128-px scene
CAPTION_H = 58
FONT = ImageFont.load_default(size=13)


def _best_target(mask: np.ndarray, targets: dict[int, np.ndarray]) -> int | None:
    """The object whose mask the prediction overlaps best (IoU), None for an empty prediction."""
    if not mask.any():
        return None
    ious = {t: (mask & m).sum() / (mask | m).sum() for t, m in targets.items()}
    return max(ious, key=ious.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--scene", default="scene_1")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "default_model_demo.png")
    args = parser.parse_args()
    pipe = RISPipeline.from_pretrained(args.model)
    scene = next(s for s in bundled_scenes() if s.name == args.scene)
    refs = [r for r in scene_references() if r.scene == args.scene]
    targets = {r.target: r.mask for r in refs}
    first = {}
    for r in refs:
        first.setdefault(r.target, r)
    queries = [(r.text, r.target) for r in first.values()]
    queries += [(q["text"], None) for q in scene.queries if q["difficulty"] == "negative"]
    image = load_image(scene.path)
    h, w = image.shape[:2]
    panels = []
    for text, target in queries:
        result = pipe(image, text)
        got = _best_target(result.union_mask(), targets)
        right = got == target if target is not None else result.rejected
        mark = "[right]" if right else "[wrong]"
        tile = Image.fromarray(overlay(image, result)).resize((w * SCALE, h * SCALE), Image.NEAREST)
        panel = Image.new("RGB", (w * SCALE, h * SCALE + CAPTION_H), "white")
        panel.paste(tile, (0, 0))
        draw = ImageDraw.Draw(panel)
        answer = "no such object" if result.rejected else f"{len(result)} mask(s)"
        lines = [*textwrap.wrap(f'{mark} "{text}"', 30)[:2], answer]
        draw.multiline_text((4, h * SCALE + 3), "\n".join(lines), fill="black", spacing=2, font=FONT)
        panels.append(panel)
    sheet = Image.new(
        "RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), "white"
    )
    for i, p in enumerate(panels):
        sheet.paste(p, (i * (p.width + 4), 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(panels)} queries on {scene.name} with {pipe.source}")


if __name__ == "__main__":
    main()
