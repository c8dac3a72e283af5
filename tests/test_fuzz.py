"""Fuzz: >= 200 malformed (and odd but valid) inputs, seeded; each call returns results or raises an
MllmRisError with a one-line message — never another exception."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from test_pipeline_kit import default_model_dir, scene_image

from mllm_ris.errors import MllmRisError
from mllm_ris.inference.pipeline import RISPipeline
from mllm_ris.inference.results import RISResult
from mllm_ris.processing.processor import Turn

SEED = 1234


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def _file_cases(rng: np.random.Generator, tmp: Path) -> list[Path]:
    """Random bytes (some behind real signatures), truncated and bit-flipped PNG / JPEG / GIF files."""
    good = {fmt: _encoded(scene_image(40, 56), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF")}
    signatures = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]
    blobs: list[bytes] = []
    for i in range(40):
        blobs.append(signatures[i % len(signatures)] + rng.bytes(int(rng.integers(0, 2000))))
    for i in range(35):
        data = good[list(good)[i % len(good)]]
        blobs.append(data[: int(rng.integers(1, len(data)))])  # truncated
    for i in range(30):
        data = bytearray(good[list(good)[i % len(good)]])
        for pos in rng.integers(8, len(data), size=int(rng.integers(1, 20))):
            data[pos] ^= int(rng.integers(1, 256))  # corrupt a few bytes after the signature
        blobs.append(bytes(data))
    paths = []
    for i, blob in enumerate(blobs):
        path = tmp / f"fuzz_{i:03d}.img"
        path.write_bytes(blob)
        paths.append(path)
    return paths


def _array_cases(rng: np.random.Generator) -> list[Any]:
    makers: list[Callable[[], Any]] = [
        lambda: rng.normal(size=(20, 20, 3)).astype(np.float32),  # negative floats
        lambda: np.full((8, 8, 3), np.nan),
        lambda: np.full((8, 8), np.inf, np.float16),
        lambda: rng.integers(-100, 100, (9, 9, 3)).astype(np.int8),
        lambda: rng.integers(0, 2**40, (9, 9)).astype(np.int64),
        lambda: np.zeros((9, 9, 3), np.complex128),
        lambda: np.array([[object()]]),
        lambda: np.array(["abc", "def"]),
        lambda: np.zeros((0, 0, 3), np.uint8),
        lambda: np.zeros((5, 0), np.uint8),
        lambda: np.zeros((3, 3, 3, 3), np.uint8),
        lambda: np.zeros((7,), np.uint8),
        lambda: np.zeros((6, 6, 5), np.uint8),
        lambda: np.zeros((6, 6, 2), np.float32),
        lambda: rng.integers(0, 2, (10, 10)).astype(bool),
        lambda: rng.integers(0, 65535, (10, 12, 3)).astype(np.uint16),
        lambda: rng.uniform(0, 1, (10, 12)).astype(np.float64),
        lambda: np.full((1, 1, 3), 255, np.uint8),
        lambda: np.full((1, 5000, 3), 30, np.uint8),
        lambda: np.full((5000, 1), 30, np.uint8),
        lambda: np.full((2, 3, 4), 200, np.uint8),
        lambda: torch.zeros(3, 8, 8),
        lambda: None,
        lambda: 12345,
        lambda: b"\x89PNG\r\n",
        lambda: [np.zeros((4, 4, 3), np.uint8)],  # a batch of one
        lambda: "/nonexistent/dir/image.png",
        lambda: "",
    ]
    return [make() for make in makers]


def _pil_cases(rng: np.random.Generator) -> list[Image.Image]:
    base = scene_image(24, 32)
    f = rng.normal(size=(24, 32)).astype(np.float32)
    f[3, 3] = np.nan
    return [
        Image.fromarray(base).convert(mode)
        for mode in ("L", "LA", "P", "1", "CMYK", "YCbCr", "HSV", "I", "RGBA", "RGBX")
    ] + [Image.fromarray(f), Image.fromarray(base[..., 0].astype(np.uint16) * 200), Image.new("RGB", (1, 1))]


def _query_cases(rng: np.random.Generator) -> list[Any]:
    random_text = [
        "".join(chr(int(c)) for c in rng.integers(1, 0x2FFFF, int(rng.integers(1, 60)))) for _ in range(12)
    ]
    controls = ["".join(chr(int(c)) for c in rng.integers(0, 32, int(rng.integers(1, 20)))) for _ in range(6)]
    return [
        *random_text,
        *controls,
        "",
        " ",
        "\n\t\r",
        "x" * 10_000,
        "x" * 1000,
        "🔴" * 999,
        "\ud800 lone surrogate",
        "<image>",
        "[SEG] [REJ] </s> <s> <pad>",
        "the <image> circle",
        "مرحبا بالعالم",
        "שלום",
        "the red circle\x00\x07",
        "A" * 999 + "\u0301",
        None,
        42,
        b"bytes query",
        [1, 2, 3],
        {"question": "a dict is not a history"},
        [],
        ["x", ""],
    ]


def _history_cases(rng: np.random.Generator) -> list[Any]:
    answered = Turn("segment the red circle", "Sure, it is [SEG].")
    cases: list[Any] = [
        [Turn("q")],
        [answered, Turn("and the shape left of it?")],
        [answered, answered],
        [Turn("a"), Turn("b")],
        [Turn("", None)],
        [Turn("<image>", None)],
        [Turn("q", "<image>"), Turn("next")],
        [{"question": None}],
        [{"question": "q", "answer": 5}, {"question": "r"}],
        [{"role": "user"}],
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "you are"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [None],
        [[None]],
        [answered] * 60 + [Turn("last")],
        [answered] * 20 + [Turn("last")],
        [Turn("x" * 900, "y" * 900)] * 3 + [Turn("last")],
        [{"question": "q", "answer": None, "extra": 1}],
        [Turn(str(rng.integers(0, 10**9)))],
        [[Turn("q")], [Turn("r", "s")]],
        [[Turn("q")], "plain"],
    ]
    return cases


def _call(pipe: RISPipeline, image: Any, query: Any) -> str:
    """Run one case; returns "ok" or "error" and fails the test on anything else."""
    try:
        out = pipe(image, query)
    except MllmRisError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"multi-line message: {message!r}"
        return "error"
    results = out if isinstance(out, list) else [out]
    assert all(isinstance(r, RISResult) and r.answer_text for r in results)
    return "ok"


def test_fuzz_pipeline(tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    pipe = RISPipeline.from_pretrained(default_model_dir(tmp_path))
    good_image, good_query = scene_image(32, 32), "the red circle"
    cases: list[tuple[Any, Any]] = []
    cases += [(path, good_query) for path in _file_cases(rng, tmp_path)]
    cases += [(array, good_query) for array in _array_cases(rng)]
    cases += [(im, good_query) for im in _pil_cases(rng)]
    cases += [(good_image, q) for q in _query_cases(rng)]
    cases += [(good_image, h) for h in _history_cases(rng)]
    cases += [([good_image, np.zeros((0, 3, 3), np.uint8)], good_query), ([good_image] * 2, ["a", "b", "c"])]
    assert len(cases) >= 200
    start = time.perf_counter()
    outcomes = {"ok": 0, "error": 0}
    for i, (image, query) in enumerate(cases):
        try:
            outcomes[_call(pipe, image, query)] += 1
        except AssertionError:
            raise
        except Exception as exc:  # the point of the test: name the case that escaped
            raise AssertionError(
                f"case {i}: {type(exc).__name__}: {exc} (query {str(query)[:60]!r})"
            ) from exc
    seconds = time.perf_counter() - start
    print(f"{len(cases)} cases: {outcomes} in {seconds:.1f} s")
    assert outcomes["ok"] >= 20 and outcomes["error"] >= 120
    assert seconds < 30
