"""``mllm-ris demo``: the default model on the bundled scenes → overlays + JSON + ``index.html`` gallery.

For every scene, each of its queries (one per SynthRef difficulty: simple, spatial, relational,
multi, negative) is segmented, and its two-turn chat is played; each answer gives
``<scene>_q<N>_overlay.png`` / ``_mask.png`` / ``.json`` (chat: ``<scene>_chat<N>_…``), and
``index.html`` shows them with the question, the answer, the scores and what SynthRef expects.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mllm_ris.inference.chat import ChatSession
from mllm_ris.inference.pipeline import RISPipeline, load_image
from mllm_ris.inference.results import (
    GalleryItem,
    RISResult,
    ensure_out_dir,
    gallery_html,
    write_atomic,
    write_result_files,
)
from mllm_ris.inference.scenes import BundledScene, bundled_scenes

__all__ = ["DemoReport", "run_demo"]


@dataclass(frozen=True)
class DemoReport:
    """What the demo wrote: the gallery page, the number of answers and of files."""

    index: Path
    answers: int
    files: int


def _caption(result: RISResult, expected: str) -> tuple[str, ...]:
    found = (
        "nothing"
        if result.rejected
        else f"{len(result)} mask(s), score " + ", ".join(f"{p.score:.2f}" for p in result)
    )
    return (f"answer: {result.answer_text}", f"found: {found}", expected)


def run_demo(
    pipeline: RISPipeline,
    out_dir: str | Path,
    *,
    scenes: list[BundledScene] | None = None,
    progress: bool = True,
) -> DemoReport:
    """Run ``pipeline`` on ``scenes`` (default: the bundled ones) and write the gallery into ``out_dir``.

    Raises:
        NotAvailableError: the bundled scenes are missing.
        InputError: ``out_dir`` cannot be created.
    """
    from tqdm import tqdm

    scenes = bundled_scenes() if scenes is None else scenes
    out = ensure_out_dir(out_dir)
    total = sum(len(s.queries) + len(s.chat) for s in scenes)
    bar = tqdm(total=total, desc="demo", unit="query", disable=None if progress else True, file=sys.stderr)
    sections: list[tuple[str, list[GalleryItem]]] = []
    answers = 0
    try:
        for scene in scenes:
            image = load_image(scene.path)
            write_atomic({out / scene.path.name: scene.path.read_bytes()})  # the input, beside its overlays
            items = [GalleryItem(scene.path.name, "input image", (f"{image.shape[1]}x{image.shape[0]} px",))]
            texts = [q["text"] for q in scene.queries]
            results = pipeline(image, texts) if texts else []
            for n, (query, result) in enumerate(zip(scene.queries, results, strict=True), start=1):
                files = write_result_files(
                    out,
                    f"{scene.name}_q{n}",
                    image,
                    result,
                    dict(
                        image=scene.path.name,
                        query=query["text"],
                        difficulty=query.get("difficulty"),
                        expected_targets=query.get("targets"),
                        model=pipeline.source,
                    ),
                )
                expected = f"SynthRef: {query.get('difficulty', '?')}, {query.get('targets', '?')} target(s)"
                items.append(GalleryItem(files.overlay.name, query["text"], _caption(result, expected)))
                bar.update(1)
            if scene.chat:
                session = ChatSession(pipeline, image)
                for n, question in enumerate(scene.chat, start=1):
                    result = session.ask(question)
                    files = write_result_files(
                        out,
                        f"{scene.name}_chat{n}",
                        image,
                        result,
                        dict(
                            image=scene.path.name,
                            question=question,
                            turn=n,
                            model=pipeline.source,
                        ),
                    )
                    items.append(
                        GalleryItem(files.overlay.name, f"chat turn {n}: {question}", _caption(result, ""))
                    )
                    bar.update(1)
            answers += len(items) - 1
            sections.append((f"{scene.name} ({image.shape[1]}x{image.shape[0]})", items))
    finally:
        bar.close()
    note = (
        f"Model: {pipeline.source or 'in memory'}. Overlays: each mask in its own colour with an outline; "
        "a dimmed picture means the model answered that nothing matches."
    )
    index = out / "index.html"
    write_atomic({index: gallery_html("mllm-ris demo", sections, note=note).encode("utf-8")})
    return DemoReport(index=index, answers=answers, files=3 * answers + len(scenes) + 1)
