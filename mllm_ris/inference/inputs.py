"""Validation of what a user hands the pipeline: images, queries and chat histories.

Every problem is an :class:`InputError` with a one-line message; nothing a user passes (a corrupt
file, a decompression bomb, a NaN array, an empty query) reaches the model or escapes as another
exception. The rules (docs/inference.md, "Bad input"):

* images: a path, a PIL image, or a numpy array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``,
  ``(H, W, 4)`` of ``uint8`` / ``bool`` / ``uint16`` / ``int32`` / float (finite, in ``[0, 1]`` or
  ``[0, 255]``). Files are decoded with Pillow: EXIF orientation applied, 16-bit and 32-bit
  integer images scaled by their maximum (as :func:`mllm_ris.data.images.read_image`), grey /
  palette / RGBA / CMYK converted to RGB (alpha dropped), the first frame of an animation.
  Images of more than ``max_pixels`` pixels are refused *before* decoding (decompression bombs).
* queries: longer than :data:`MAX_QUERY_CHARS` characters is refused (not truncated); control
  characters and lone surrogates become spaces, whitespace runs collapse; empty after that is
  refused; any script works (the tokenizers are byte-level BPE, or WordPiece with ``[UNK]``). The
  pipeline also removes the tokenizer's special tokens (``<image>``, ``[SEG]``, ``</s>`` …) from
  questions.
* chat histories: a non-empty list of :class:`~mllm_ris.processing.processor.Turn` or of
  ``{"question": str, "answer": str | None}`` / ``{"role": "user" | "assistant", "content": str}``
  dicts; every turn but the last is answered, the last one is open.
"""

from __future__ import annotations

import io
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mllm_ris.errors import MllmRisError
from mllm_ris.processing.processor import Turn

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_QUERY_CHARS",
    "MAX_TURNS",
    "ImageInput",
    "InputError",
    "check_query",
    "load_image",
    "to_turns",
]

MAX_QUERY_CHARS = 1000
"""Longest accepted query / chat turn, in characters (longer ones are refused, not truncated)."""
MAX_IMAGE_PIXELS = 64_000_000
"""Largest accepted image (width x height), checked from the header before any pixel is decoded."""
MAX_TURNS = 32
"""Most turns in one chat history (the prompt must also fit the LLM's context; checked later)."""

ImageInput = Union[str, Path, Image.Image, np.ndarray]  # noqa: UP007 - a runtime alias (py3.10)


class InputError(MllmRisError, ValueError):
    """An image, query or chat history the pipeline cannot use (the message says which and why)."""


# ------------------------------------------------------------------------------------------ images


def load_image(image: Any, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> np.ndarray:
    """Any accepted image input → ``(H, W, 3)`` uint8 RGB (a new array).

    Args:
        image: a path (str / Path), a PIL image, or a numpy array (rules in the module docstring).
        max_pixels: refuse images with more pixels than this.
        name: how to call the image in messages (default: its path, or "image").

    Raises:
        InputError: unreadable, corrupt, truncated, too large, empty, or of an unsupported type.
    """
    if isinstance(image, (str, Path)):
        return _load_path(Path(image), max_pixels)
    label = name or "image"
    if isinstance(image, Image.Image):
        _check_size(image.size, max_pixels, label)
        return _decode(image, label)
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels, label)
    raise InputError(
        f"{label}: expected a file path, a PIL image or a numpy array, got {type(image).__name__}"
    )


def _check_size(size: tuple[int, int], max_pixels: int, label: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise InputError(f"{label}: empty image ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise InputError(
            f"{label}: {w}x{h} = {w * h} pixels is more than the limit of {max_pixels} "
            "(a possible decompression bomb; resize it first)"
        )


def _load_path(path: Path, max_pixels: int) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"image not found: {path}" if not path.exists() else f"not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:
        raise InputError(f"cannot read image {path}: the file is empty")
    with warnings.catch_warnings():
        # Pillow warns (then raises) on decompression bombs; the size check below comes first anyway
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like: decoding decides
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise InputError(f"image {path}: {exc}") from None
        except UnidentifiedImageError:
            raise InputError(f"cannot read image {path}: not an image format Pillow can decode") from None
        except Exception as exc:  # Pillow raises many types for foreign / corrupt headers
            raise InputError(f"cannot read image {path}: {_first_line(exc)}") from None
        with im:
            _check_size(im.size, max_pixels, f"image {path}")
            return _decode(im, f"image {path}")


def _decode(im: Image.Image, label: str) -> np.ndarray:
    """Decode a PIL image (lazy or loaded) to ``(H, W, 3)`` uint8; corrupt data → InputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": orientation is skipped
            im.seek(0)  # the first frame of an animation
            im.load()
            im = ImageOps.exif_transpose(im) or im
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16 / 32-bit integer: scale by max
                arr = np.asarray(im, dtype=np.float64)
                return _stretch(arr, label)
            if im.mode == "F":
                return _from_array(np.asarray(im, dtype=np.float32), None, label)
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except InputError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error ...
        raise InputError(f"cannot read {label}: {_first_line(exc)}") from None


def _stretch(arr: np.ndarray, label: str) -> np.ndarray:
    """Integer data of any range → uint8 scaled by the maximum (``read_image``'s rule), grey → RGB."""
    if arr.min() < 0:
        raise InputError(f"{label}: negative pixel values (min {arr.min():g})")
    scale = 255.0 / max(float(arr.max()), 1.0)
    out = (arr * scale).round().clip(0, 255).astype(np.uint8)
    return _to_rgb(out, label)


def _to_rgb(arr: np.ndarray, label: str) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``, ``(H, W, 4)`` uint8 → ``(H, W, 3)`` uint8 (a copy)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels in (3, 4):
        return np.ascontiguousarray(arr[..., :3])
    raise InputError(f"{label}: {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")


def _from_array(arr: np.ndarray, max_pixels: int | None, label: str) -> np.ndarray:
    if arr.ndim not in (2, 3):
        raise InputError(f"{label}: array of shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    h, w = arr.shape[:2]
    if max_pixels is not None:
        _check_size((w, h), max_pixels, label)
    elif h < 1 or w < 1:
        raise InputError(f"{label}: empty image ({w}x{h} pixels)")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        raise InputError(f"{label}: array of shape {arr.shape}; expected 1, 3 or 4 channels")
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return _to_rgb(arr, label)
    if kind == "b":
        return _to_rgb(arr.astype(np.uint8) * 255, label)
    if kind in "ui":
        return _stretch(arr.astype(np.float64), label)
    if kind == "f":
        data = arr.astype(np.float64)
        if not np.isfinite(data).all():
            raise InputError(f"{label}: float array holds NaN or infinity")
        low, high = float(data.min()), float(data.max())
        if low < 0 or high > 255:
            raise InputError(f"{label}: float values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
        if high <= 1.0:
            data = data * 255.0
        return _to_rgb(data.round().clip(0, 255).astype(np.uint8), label)
    raise InputError(f"{label}: unsupported array dtype {arr.dtype}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------- text and chats


def check_query(query: Any, *, what: str = "query", max_chars: int = MAX_QUERY_CHARS) -> str:
    """A cleaned query: control characters → spaces, whitespace runs collapsed, stripped.

    Raises:
        InputError: not a string, empty / whitespace-only, or longer than ``max_chars`` characters.
    """
    if not isinstance(query, str):
        raise InputError(f"{what}: expected a string, got {type(query).__name__}")
    if len(query) > max_chars:
        raise InputError(f"{what}: {len(query)} characters, more than the limit of {max_chars}")
    # control characters (Cc) and lone surrogates (Cs, not encodable) become spaces; format characters
    # (Cf: zero-width joiners of Persian, Indic scripts, emoji) are kept
    cleaned = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in query)
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        raise InputError(f"{what}: empty (or only whitespace / control characters)")
    return cleaned


def to_turns(history: Sequence[Any], *, max_turns: int = MAX_TURNS) -> list[Turn]:
    """A chat history → :class:`Turn` objects (last one open).

    Accepted items: ``Turn``; ``{"question": q, "answer": a}``; or OpenAI-style
    ``{"role": "user" | "assistant", "content": text}`` messages alternating user / assistant and
    ending with a user message.

    Raises:
        InputError: empty, too long, malformed items, an unanswered turn before the last, or an
            answered last turn.
    """
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise InputError(f"chat history: expected a list of turns, got {type(history).__name__}")
    if not history:
        raise InputError("chat history: empty; it needs at least one question")
    items = list(history)
    if all(isinstance(i, Mapping) and "role" in i for i in items):
        items = _from_messages(items)
    turns: list[Turn] = []
    for i, item in enumerate(items):
        if isinstance(item, Turn):
            question, answer = item.question, item.answer
        elif isinstance(item, Mapping) and "question" in item:
            question, answer = item["question"], item.get("answer")
        else:
            raise InputError(
                f"chat history: turn {i} is a {type(item).__name__}; expected a Turn or "
                "{'question': ..., 'answer': ...}"
            )
        question = check_query(question, what=f"chat history: turn {i} question")
        last = i == len(items) - 1
        if last and answer is not None:
            raise InputError(f"chat history: the last turn ({i}) is already answered; add a new question")
        if not last:
            if answer is None:
                raise InputError(f"chat history: turn {i} has no answer; only the last turn may be open")
            answer = check_query(answer, what=f"chat history: turn {i} answer")
        turns.append(Turn(question, answer))
    if len(turns) > max_turns:
        raise InputError(f"chat history: {len(turns)} turns, more than the limit of {max_turns}")
    return turns


def _from_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``[{"role": "user", ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}]`` → turn dicts."""
    turns: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise InputError(f"chat history: message {i} has role {role!r}; expected {expected!r}")
        if role == "user":
            turns.append({"question": content, "answer": None})
        else:
            turns[-1]["answer"] = content
    return turns
