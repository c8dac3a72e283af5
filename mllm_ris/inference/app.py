"""``mllm-ris app``: a Gradio web demo (upload an image, type a query, get the overlay and the answer).

Gradio is imported lazily (the ``demo`` extra: ``pip install 'mllm-ris[demo]'``). The server listens
on 127.0.0.1 unless told otherwise, refuses uploads over ``max_file_size`` (Gradio's own limit), and
decodes uploads with the pipeline's checks (decompression bombs, corrupt files → a one-line error in
the page). Analytics are switched off before Gradio is imported; nothing is fetched from the network.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from mllm_ris.errors import MllmRisError, NotAvailableError
from mllm_ris.inference.pipeline import MAX_QUERY_CHARS, InputError, RISPipeline, load_image
from mllm_ris.inference.results import overlay
from mllm_ris.inference.scenes import ASSETS_DIR, BundledScene, bundled_scenes
from mllm_ris.inference.segment import summary_line

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["DEFAULT_MAX_FILE_SIZE", "build_app", "launch", "segment_for_app"]

DEFAULT_MAX_FILE_SIZE = "10mb"
_INTRO = (
    "### mllm-ris — referring image segmentation\n"
    'Upload an image, describe one object ("the red circle", "the leftmost square") and press '
    "**Segment**. The bundled default model is tiny and was trained only on synthetic SynthRef scenes "
    "(coloured shapes on textured backgrounds): it does not understand real photos."
)


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise NotAvailableError("the app needs gradio: pip install 'mllm-ris[demo]'") from None
    return gradio


def segment_for_app(
    pipeline: RISPipeline, image_path: str | None, query: str | None
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """One request: ``(overlay (H, W, 3) uint8, answer line, JSON summary)``.

    Raises:
        InputError: no image, or an image / query the pipeline refuses.
    """
    if not image_path:
        raise InputError("upload an image first")
    image = load_image(image_path, max_pixels=pipeline.max_pixels)
    result = pipeline(image, query if query is not None else "")
    return overlay(image, result), summary_line(result).removeprefix("answer: "), result.to_json()


def _examples(scenes: list[BundledScene] | None) -> list[list[str]]:
    if scenes is None:
        try:
            scenes = bundled_scenes()
        except NotAvailableError:
            return []
    return [[str(s.path), q["text"]] for s in scenes for q in s.queries[:2]]


def build_app(pipeline: RISPipeline, *, scenes: list[BundledScene] | None = None) -> gr.Blocks:
    """The Gradio interface around ``pipeline`` (examples from ``scenes``, default: the bundled ones).

    Element ids (for tests and styling): ``input-image``, ``query``, ``segment``, ``overlay``, ``answer``.
    """
    gr = _gradio()

    def run(image_path: str | None, query: str | None) -> tuple[np.ndarray, str, dict[str, Any]]:
        try:
            return segment_for_app(pipeline, image_path, query)
        except MllmRisError as exc:
            raise gr.Error(str(exc)) from None

    with gr.Blocks(title="mllm-ris", analytics_enabled=False) as app:
        gr.Markdown(_INTRO)
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    image_mode=None,  # our loader converts (16-bit, RGBA, EXIF) with its own checks
                    sources=["upload", "clipboard"],
                    label="image",
                    height=320,
                    elem_id="input-image",
                )
                query = gr.Textbox(
                    label="query",
                    placeholder="the red circle",
                    max_length=MAX_QUERY_CHARS,
                    elem_id="query",
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                shown = gr.Image(
                    label="overlay", type="numpy", format="png", interactive=False, elem_id="overlay"
                )
                answer = gr.Textbox(label="answer", interactive=False, elem_id="answer")
                details = gr.JSON(label="masks: score, COCO box [x, y, w, h], RLE")
        examples = _examples(scenes)
        if examples:
            gr.Examples(examples=examples, inputs=[image, query], label="SynthRef sample scenes")
        gr.Markdown(f"Model: `{pipeline.source or 'in memory'}` · canvas {pipeline.image_size} px")
        button.click(run, [image, query], [shown, answer, details])
        query.submit(run, [image, query], [shown, answer, details])
    app.queue(default_concurrency_limit=1)
    return app


def launch(
    pipeline: RISPipeline,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    block: bool = True,
    quiet: bool = False,
    scenes: list[BundledScene] | None = None,
) -> gr.Blocks:
    """Serve :func:`build_app` on ``host:port`` (``port`` None: Gradio picks a free one from 7860).

    Args:
        max_file_size: uploads larger than this are refused by Gradio (``"10mb"``, or bytes).
        block: serve until interrupted (the CLI); False returns at once with the server running
            (stop it with ``app.close()``).
    """
    app = build_app(pipeline, scenes=scenes)
    scene_dir = scenes[0].path.parent if scenes else ASSETS_DIR / "scenes"
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=max_file_size,
        prevent_thread_lock=not block,
        share=False,
        inbrowser=False,
        quiet=quiet,
        ssr_mode=False,
        show_error=True,
        allowed_paths=[str(scene_dir)],
    )
    return app
