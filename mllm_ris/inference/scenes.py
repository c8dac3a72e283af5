"""The bundled sample scenes (package data under ``mllm_ris/assets/``)::

    mllm_ris/assets/scenes/          a few SynthRef scenes (PNG) + scenes.json (queries, chat turns)

what the demo, the app and the tests show the bundled default model (``mllm_ris/assets/default_model/``,
found by :func:`~mllm_ris.inference.pipeline.default_model_path`; how it is built and what it can do:
docs/default_model.md). :func:`make_sample_scenes` renders them, :func:`scene_references` checks them
against SynthRef's render.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mllm_ris.errors import NotAvailableError

__all__ = [
    "ASSETS_DIR",
    "BundledScene",
    "SceneReference",
    "bundled_scenes",
    "make_sample_scenes",
    "scene_references",
]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
_SCENES_DIR = ASSETS_DIR / "scenes"
_SCENES_FILE = "scenes.json"


@dataclass(frozen=True)
class BundledScene:
    """One sample scene.

    Attributes:
        path: the PNG.
        queries: referring expressions with what SynthRef knows about them: ``text``,
            ``difficulty`` (simple / spatial / relational / multi / negative) and ``targets``
            (the number of referred objects; 0 for a negative).
        chat: questions for a multi-turn demo, asked in order.
    """

    path: Path
    queries: tuple[dict[str, Any], ...]
    chat: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        """The file stem, e.g. ``scene_1``."""
        return self.path.stem


def bundled_scenes(folder: str | Path | None = None) -> list[BundledScene]:
    """The sample scenes listed in ``scenes.json`` (default: the bundled folder).

    Raises:
        NotAvailableError: the folder or its ``scenes.json`` is missing or malformed.
    """
    root = Path(folder) if folder is not None else _SCENES_DIR
    index = root / _SCENES_FILE
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))["scenes"]
        scenes = [
            BundledScene(root / e["file"], tuple(e["queries"]), tuple(e.get("chat", ()))) for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotAvailableError(f"sample scenes: cannot read {index}: {exc}") from None
    missing = [s.path.name for s in scenes if not s.path.is_file()]
    if missing:
        raise NotAvailableError(f"sample scenes: {index} lists missing files {missing}")
    return scenes


# difficulty order of the queries kept per scene (one each when the scene has one)
_KEEP = ("simple", "spatial", "relational", "multi", "negative")


def make_sample_scenes(
    out_dir: str | Path, *, count: int = 5, seed: int = 2024, size: int = 128
) -> list[BundledScene]:
    """Render ``count`` SynthRef scenes into ``out_dir`` with ``scenes.json`` (files replaced).

    A scene is kept when it has an expression of every difficulty; per scene one query of each
    difficulty is stored (the first SynthRef generated) and a two-turn chat: two single-target
    objects, each asked for as the model was trained ("Please segment {expr}.").

    Args:
        count: scenes to write (``scene_1.png`` …).
        seed: SynthRef seed (scene ``i`` of the dataset ``(seed, size)``; deterministic).
        size: image side in pixels (128 is the default model's canvas).

    Returns:
        the scenes, as :func:`bundled_scenes` reads them back.
    """
    from mllm_ris.data._synth_render import render_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        index = 0
        while len(entries) < count:
            if index > 100 * count:  # SynthRef scenes nearly always qualify; never loop forever
                raise RuntimeError(f"only {len(entries)} of {count} scenes qualified in {index} tries")
            record = render_image(index, seed=seed, size=size, image_dir=tmp)
            index += 1
            by_level: dict[str, dict[str, Any]] = {}
            for e in record.expressions:
                by_level.setdefault(e["difficulty"], e)
            singles = [e for e in record.expressions if e["difficulty"] == "simple"]
            if set(by_level) != set(_KEEP) or len(singles) < 2:
                continue
            name = f"scene_{len(entries) + 1}.png"
            pixels = np.asarray(Image.open(Path(tmp) / record.file_name).convert("RGB"))
            Image.fromarray(pixels).save(out / name, format="PNG", optimize=True)
            queries = [
                {"text": by_level[d]["text"], "difficulty": d, "targets": len(by_level[d]["targets"])}
                for d in _KEEP
            ]
            chat = [f"Please segment {singles[0]['text']}.", f"Please segment {singles[1]['text']}."]
            entries.append({"file": name, "queries": queries, "chat": chat, "synthref_index": index - 1})
    meta = {"generator": "mllm_ris.inference.scenes.make_sample_scenes", "seed": seed, "size": size}
    (out / _SCENES_FILE).write_text(
        json.dumps({**meta, "scenes": entries}, indent=2) + "\n", encoding="utf-8"
    )
    return bundled_scenes(out)


@dataclass(frozen=True)
class SceneReference:
    """One single-target SynthRef expression of a sample scene and its ground truth.

    Attributes:
        scene: the scene's file stem (``scene_1``).
        text: the expression.
        difficulty: simple / spatial / relational.
        target: the referred object's index in the scene (two expressions with the same index name the
            same object).
        mask: ``(H, W)`` bool, the object's visible pixels.
    """

    scene: str
    text: str
    difficulty: str
    target: int
    mask: np.ndarray


def scene_references(folder: str | Path | None = None) -> list[SceneReference]:
    """Every single-target expression SynthRef made for each sample scene, with its target mask,
    re-rendered from the seed and index in ``scenes.json`` (deterministic; the PNG is checked against
    the render). The ground truth of the "does the model follow the sentence" check on these scenes.

    Raises:
        NotAvailableError: ``scenes.json`` has no seed / index, or a render differs from its PNG.
    """
    from mllm_ris.data._synth_render import render_image
    from mllm_ris.processing.masks import decode_segmentation

    root = Path(folder) if folder is not None else _SCENES_DIR
    meta = json.loads((root / _SCENES_FILE).read_text(encoding="utf-8"))
    out: list[SceneReference] = []
    with tempfile.TemporaryDirectory() as tmp:
        for scene, entry in zip(bundled_scenes(root), meta["scenes"], strict=True):
            if "synthref_index" not in entry or "seed" not in meta:
                raise NotAvailableError(f"sample scenes: {root / _SCENES_FILE} has no SynthRef seed / index")
            record = render_image(
                entry["synthref_index"], seed=meta["seed"], size=meta["size"], image_dir=tmp
            )
            rendered = np.asarray(Image.open(Path(tmp) / record.file_name).convert("RGB"))
            if not np.array_equal(rendered, np.asarray(Image.open(scene.path).convert("RGB"))):
                raise NotAvailableError(f"sample scenes: {scene.path.name} is not SynthRef's render any more")
            h, w = rendered.shape[:2]
            for e in record.expressions:
                if len(e["targets"]) != 1:
                    continue
                target = int(e["targets"][0])
                mask = decode_segmentation(record.objects[target]["rle"], h, w).astype(bool)
                out.append(SceneReference(scene.name, e["text"], e["difficulty"], target, mask))
    return out
