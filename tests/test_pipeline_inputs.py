"""Input validation of the pipeline (no model): image files / PIL / arrays, queries, chat histories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline_kit import png_header

from mllm_ris.errors import MllmRisError
from mllm_ris.inference.pipeline import MAX_QUERY_CHARS, InputError, check_query, load_image, to_turns
from mllm_ris.processing.processor import Turn


def _rgb(h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_path_pil_and_array_agree(tmp_path: Path) -> None:
    image = _rgb()
    Image.fromarray(image).save(tmp_path / "a.png")
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(image), image):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
        np.testing.assert_array_equal(out, image)
    assert load_image(image) is not image  # a copy: the caller's array is never modified


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = _rgb(20, 40)  # H 20, W 40 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(image).save(tmp_path / "rot.png", exif=exif.tobytes())
    out = load_image(tmp_path / "rot.png")
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out, np.rot90(image, k=-1))


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda a: Image.fromarray(a[..., 0])),
        ("RGBA", lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 7, np.uint8)]))),
        ("I;16", lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 200)),
        ("P", lambda a: Image.fromarray(a).convert("P")),
        ("1", lambda a: Image.fromarray(a[..., 0] > 128)),
        ("CMYK", lambda a: Image.fromarray(a).convert("CMYK")),
        ("LA", lambda a: Image.fromarray(a[..., 0]).convert("LA")),
    ],
)
def test_file_modes_become_rgb(tmp_path: Path, mode: str, make: Callable[[np.ndarray], Image.Image]) -> None:
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    make(_rgb()).save(path)
    out = load_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode == "I;16":  # scaled by the maximum, as read_image does
        assert out.max() == 255


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((0, 5, 3), np.uint8), "empty image"),
        (np.zeros((4, 4, 2), np.uint8), "channels"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
        (np.full((4, 4, 3), -1.0), "float values"),
        (np.full((4, 4, 3), 300.0), "float values"),
        (np.full((4, 4), -5, np.int16), "negative"),
        (np.zeros((4, 4), np.complex64), "dtype"),
        (np.array([["a"]]), "dtype"),
    ],
)
def test_bad_arrays_are_refused(array: np.ndarray, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        load_image(array)


def test_array_dtypes_are_converted() -> None:
    assert load_image(np.ones((3, 4), bool)).max() == 255
    assert load_image(np.full((3, 4, 1), 0.5)).max() == 128  # floats in [0, 1] are scaled
    assert load_image(np.full((3, 4, 3), 200.0)).max() == 200  # floats in [0, 255] kept
    assert load_image(np.full((3, 4), 4000, np.uint16)).max() == 255
    assert load_image(np.zeros((1, 5000, 4), np.uint8)).shape == (1, 5000, 3)


def test_bad_files_fail_with_one_line_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(64, 64)).save(good)
    data = good.read_bytes()
    cases = {
        "missing.png": None,
        "empty.png": b"",
        "random.png": np.random.default_rng(1).bytes(500),
        "truncated.png": data[: len(data) // 2],
        "header_only.png": data[:40],
        "text.jpg": b"this is not an image\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(InputError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message
    with pytest.raises(InputError, match="not a file"):
        load_image(tmp_path)


def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header(9000, 9000))  # 81 MP: over our limit, under Pillow's
    with pytest.raises(InputError, match="more than the limit"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "huge.png").write_bytes(png_header(100_000, 100_000))  # Pillow's own bomb error
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(tmp_path / "huge.png")
    with pytest.raises(InputError, match="more than the limit of 100"):
        load_image(_rgb(20, 30), max_pixels=100)
    with pytest.raises(InputError, match="more than the limit"):
        load_image(Image.new("RGB", (50, 50)), max_pixels=100)


def test_unsupported_types_are_refused() -> None:
    for value in (None, 3, b"\x89PNG", [[1, 2]]):
        with pytest.raises(InputError, match="expected a file path"):
            load_image(value)


def test_queries() -> None:
    assert check_query("  the red\tcircle \n") == "the red circle"
    assert check_query("красный круг 🔴") == "красный круг 🔴"
    assert check_query("a\x00b\x1bc") == "a b c"
    assert check_query("زن\u200cها") == "زن\u200cها"  # a zero-width non-joiner (Persian) is kept
    assert check_query("x" * MAX_QUERY_CHARS) == "x" * MAX_QUERY_CHARS
    for bad, fragment in [("", "empty"), (" \t\n", "empty"), ("\x00\x01", "empty"), (None, "a string")]:
        with pytest.raises(InputError, match=fragment):
            check_query(bad)
    with pytest.raises(InputError, match="10000 characters, more than the limit of 1000"):
        check_query("y" * 10_000)


def test_chat_histories() -> None:
    turns = [Turn("segment the red circle", "Sure, it is [SEG]."), Turn("and the shape left of it?")]
    as_dicts = [{"question": t.question, "answer": t.answer} for t in turns]
    messages = [
        {"role": "user", "content": "segment the red circle"},
        {"role": "assistant", "content": "Sure, it is [SEG]."},
        {"role": "user", "content": "and the shape left of it?"},
    ]
    assert to_turns(turns) == to_turns(as_dicts) == to_turns(messages) == turns
    bad = [
        ([], "empty"),
        ("segment it", "a list of turns"),
        ([Turn("a"), Turn("b")], "turn 0 has no answer"),
        ([Turn("a", "Sure, it is [SEG].")], "already answered"),
        ([{"role": "assistant", "content": "x"}], "expected 'user'"),
        ([{"question": ""}], "empty"),
        ([42], "turn 0 is a int"),
        ([Turn("q", "a")] * 40 + [Turn("last")], "more than the limit"),
    ]
    for history, fragment in bad:
        with pytest.raises(InputError, match=fragment):
            to_turns(history)
    assert issubclass(InputError, MllmRisError) and issubclass(InputError, ValueError)
