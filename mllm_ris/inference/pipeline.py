"""RISPipeline: image + query (or chat history) → masks, scores, COCO RLEs, boxes and the answer text.

``RISPipeline.from_pretrained(None)`` loads the bundled default model (or ``$MLLM_RIS_DEFAULT_MODEL``);
any folder written by ``RISModel.save_pretrained`` works. The pipeline validates the inputs
(:func:`load_image`, :func:`check_query`, below; once: ``predict(..., checked=True)`` takes inputs a
caller already checked), turns queries and chat histories into conversations, shrinks large images,
hands them to the model's :class:`~mllm_ris.processing.processor.Processor` (letterbox, superpixels,
region descriptors, chat encoding: the input path of training and evaluation too), runs the batch with
:class:`~mllm_ris.modeling.predictor.RISPredictor` (``RISModel.generate``, ``unletterbox``) and builds
the result types. Nothing here touches the network.

Loading, here too: which model folder (:func:`default_model_path`: ``$MLLM_RIS_DEFAULT_MODEL`` or the
bundled ``mllm_ris/assets/default_model/``, docs/default_model.md), the device and dtype checks
(:func:`check_device`, :func:`as_dtype`) and the model's placement (:func:`place`); the folder checks
are the model folder format's (:mod:`mllm_ris.modeling.model_io`).

Plain queries are asked as the model was trained: ``"Please segment {query}."``; chat-history
questions are used as written.

**The inputs** (:func:`load_image`, :func:`check_query`, :func:`to_turns`): validation of what a user
hands the pipeline: images, queries and chat histories.

Every problem is an :class:`~mllm_ris.errors.InputError` with a one-line message; nothing a user
passes (a corrupt file, a decompression bomb, a NaN array, an empty query) reaches the model or escapes
as another exception. The rules (docs/inference.md, "Bad input"):

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
import os
import threading
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union, overload

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mllm_ris.errors import CheckpointError, ConfigError, InputError, MllmRisError, NotAvailableError
from mllm_ris.inference.results import Prediction, RISResult
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.model_io import DEFAULT_IMAGE_SIZE, check_model_folder, recorded_image_size
from mllm_ris.modeling.predictor import ModelPrediction, RISPredictor
from mllm_ris.processing.masks import encode_rle, mask_to_box
from mllm_ris.processing.processor import QUESTION_TEMPLATES, ChatTemplate, MLLMBatch, RISBatch, Turn

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_MODEL_ENV",
    "MAX_IMAGE_PIXELS",
    "MAX_QUERY_CHARS",
    "MAX_TURNS",
    "WORK_SIDE",
    "ImageInput",
    "InputError",
    "Prediction",
    "RISPipeline",
    "RISResult",
    "as_dtype",
    "check_device",
    "check_query",
    "default_model_installed",
    "default_model_path",
    "load_image",
    "place",
    "to_turns",
]

WORK_SIDE = 1024
"""Images with a longer side are downscaled to it before the model (masks come back at full size)."""
_TEMPLATE = ChatTemplate(questions=QUESTION_TEMPLATES[:1], seed=None)  # "Please segment {expr}."
DEFAULT_MODEL_ENV = "MLLM_RIS_DEFAULT_MODEL"
_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
_HOW_TO_BUILD = (
    "build it as docs/default_model.md says (mllm-ris make-synthref, mllm-ris train, then "
    "mllm-ris export RUN --out mllm_ris/assets/default_model), or pass a model folder"
)


# ------------------------------------------------------------------ the inputs: the bad-input rules

MAX_QUERY_CHARS = 1000
"""Longest accepted query / chat turn, in characters (longer ones are refused, not truncated)."""
MAX_IMAGE_PIXELS = 64_000_000
"""Largest accepted image (width x height), checked from the header before any pixel is decoded."""
MAX_TURNS = 32
"""Most turns in one chat history (the prompt must also fit the LLM's context; checked later)."""

ImageInput = Union[str, Path, Image.Image, np.ndarray]  # noqa: UP007 - a runtime alias (py3.10)


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


# ------------------------------------------------------------------ which model folder, loaded how


def _bundled_or_env() -> tuple[Path, bool]:
    """The default model folder and whether it came from ``$MLLM_RIS_DEFAULT_MODEL``."""
    env = os.environ.get(DEFAULT_MODEL_ENV, "").strip()
    return (Path(env), True) if env else (_MODEL_DIR, False)


def default_model_installed() -> bool:
    """Whether :func:`default_model_path` would succeed (a ``config.json`` is in the folder)."""
    folder, _ = _bundled_or_env()
    return (folder / "config.json").is_file()


def default_model_path() -> Path:
    """The default model folder: ``$MLLM_RIS_DEFAULT_MODEL`` if set, else the bundled one.

    Raises:
        NotAvailableError: the folder holds no ``config.json`` (one line saying how to build it).
    """
    folder, from_env = _bundled_or_env()
    if (folder / "config.json").is_file():
        return folder
    if from_env:
        raise NotAvailableError(f"{DEFAULT_MODEL_ENV}={folder}: no config.json there (not a model folder)")
    raise NotAvailableError(
        f"the bundled default model is not installed (no {folder}/config.json); {_HOW_TO_BUILD}"
    )


def place(model: RISModel, device: torch.device, dtype: torch.dtype) -> RISModel:
    """Move ``model`` to ``device``; the LLM and vision tower take ``dtype`` (the heads, projector and
    pixel encoder stay float32: the model casts between them, docs/model.md)."""
    model = model.to(device)
    if dtype != torch.float32:
        if model.mllm is not None and model.cfg.mllm.quantization == "none":
            model.mllm.llm.to(dtype)
        if model.vision is not None:
            model.vision.to(dtype)
    return model.eval()


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``bfloat16`` / ``float16`` or their names → the dtype; else ``ConfigError``."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def check_device(device: str | torch.device) -> torch.device:
    """A usable ``torch.device``; an unknown or unavailable one → ``ConfigError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} requested, but no CUDA device is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {device} requested, but MPS is not available")
    return dev


# ------------------------------------------------------------------ the pipeline


class RISPipeline:
    """Referring segmentation of images from queries or chat histories (see the module docstring).

    Args:
        model: a :class:`RISModel` (moved to ``device`` / ``dtype`` here, put in eval mode).
        image_size: canvas side ``S`` the model was trained at.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …
        dtype: the floating dtype of the LLM and vision tower (``torch.float32``, ``torch.bfloat16``,
            ``torch.float16``, or their names); the heads stay float32.
        batch_size: images per forward pass for list inputs.
        max_new_tokens: answer length limit of the grounding LLM.
        max_pixels: larger images are refused before decoding.
        superpixel_cache: a folder caching superpixel label maps (default: none, whatever the
            model's config says).
        source: where the model came from (shown by the CLI / app).
    """

    def __init__(
        self,
        model: RISModel,
        *,
        image_size: int = DEFAULT_IMAGE_SIZE,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        max_pixels: int = MAX_IMAGE_PIXELS,
        superpixel_cache: str | None = None,
        source: str = "",
    ) -> None:
        dtype = as_dtype(dtype)
        if batch_size < 1 or max_new_tokens < 1 or max_pixels < 1 or image_size < 16:
            raise ConfigError(
                f"batch_size / max_new_tokens / max_pixels must be >= 1 and image_size >= 16, got "
                f"{batch_size} / {max_new_tokens} / {max_pixels} / {image_size}"
            )
        self.device = check_device(device)
        self.dtype = dtype
        self.model = place(model, self.device, dtype)
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.source = source
        self._predictor = RISPredictor(
            self.model,
            image_size=image_size,
            device=self.device,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            template=_TEMPLATE,
            # a training run's superpixel cache folder means nothing here: off unless asked for
            superpixel_cache=superpixel_cache,
        )
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()  # the app may call from several threads
        tok = model.mllm.tokenizer if model.mllm is not None else None
        specials = [str(t) for t in (tok.all_special_tokens if tok is not None else []) if len(str(t)) > 1]
        self._strip_questions = sorted(specials, key=len, reverse=True)
        keep = {"[SEG]", "[REJ]"}
        self._strip_answers = [t for t in self._strip_questions if t not in keep]

    @property
    def batch_size(self) -> int:
        """Images per forward pass."""
        return self._predictor.batch_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        image_size: int | None = None,
        **kwargs: Any,
    ) -> RISPipeline:
        """Load a model folder (``None``: the bundled default model) into a pipeline, offline.

        Args:
            path: a folder written by ``RISModel.save_pretrained``; None for the default model.
            image_size: canvas side; default ``data.image_size`` from the folder's ``config.json``
                when it has a ``data`` section, else :data:`DEFAULT_IMAGE_SIZE`.
            kwargs: the other :class:`RISPipeline` arguments.

        Raises:
            NotAvailableError: ``path`` is None and the default model is not installed.
            CheckpointError: the folder is missing, not a model folder, or does not fit its config.
        """
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
        if (
            not torch.cuda.is_available()
        ):  # deepspeed (imported by peft / accelerate) warns on stderr otherwise
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        folder = default_model_path() if path is None else Path(path)
        check_model_folder(folder)
        device = check_device(device)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bars on stderr for a few MB
        try:
            model = RISModel.from_pretrained(folder, device=device)
        except MllmRisError:
            raise
        except Exception as exc:  # a foreign / damaged folder fails deep inside transformers or safetensors
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"cannot load the model in {folder}: {type(exc).__name__}: {first}"
            ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        size = image_size if image_size is not None else recorded_image_size(folder)
        return cls(model, image_size=size, device=device, dtype=dtype, source=str(folder), **kwargs)

    # --------------------------------------------------------------------------------- calling

    @overload
    def __call__(self, image: Any, query: str | Sequence[Turn | dict[str, Any]]) -> RISResult: ...
    @overload
    def __call__(self, image: Any, query: Sequence[Any]) -> list[RISResult]: ...
    def __call__(self, image: Any, query: Any) -> RISResult | list[RISResult]:
        """Segment ``image`` from ``query``.

        Args:
            image: a path, PIL image or ``(H, W[, C])`` array; or a list of them (a batch).
            query: a referring expression (str); a chat history (list of ``Turn`` /
                ``{"question", "answer"}`` / ``{"role", "content"}``, the last turn open); or a list
                of expressions / histories (a batch).

        Returns:
            a :class:`RISResult` (a sequence of :class:`Prediction`); a list of them when ``image`` or
            ``query`` is a list (a single image or query is paired with every item of the other).

        Raises:
            InputError: an image, query or history the pipeline cannot use (one line).
        """
        images, image_batch = _as_batch(image, _is_image_batch(image))
        queries, query_batch = _as_batch(query, _is_query_batch(query))
        if image_batch and query_batch and len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} queries; give one or as many")
        if not images or not queries:
            raise InputError("empty batch: no image or no query")
        n = max(len(images), len(queries))
        results = self.predict(
            [images[i % len(images)] for i in range(n)], [queries[i % len(queries)] for i in range(n)]
        )
        return results if image_batch or query_batch else results[0]

    def predict(
        self, images: Sequence[Any], queries: Sequence[Any], *, checked: bool = False
    ) -> list[RISResult]:
        """Pairs ``(images[i], queries[i])`` → one result each; validated up front, run in batches.

        Args:
            checked: the images are arrays from :func:`~mllm_ris.inference.pipeline.load_image` and the
                string queries results of :func:`~mllm_ris.inference.pipeline.check_query` (e.g.
                ``mllm-ris segment`` checks them before loading the model): not checked again.
        """
        if len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} queries")
        turns = [self.conversation(q, checked=checked) for q in queries]
        # classic mode reads the bare expression; mllm mode the conversation
        texts = [
            self.expression(q, checked=checked) if isinstance(q, str) else t[-1].question
            for q, t in zip(queries, turns, strict=True)
        ]
        loaded: dict[int, np.ndarray] = {}  # the same object given for several queries is read once
        for im in images:
            if id(im) not in loaded:
                loaded[id(im)] = im if checked else load_image(im, max_pixels=self.max_pixels)
        arrays = [loaded[id(im)] for im in images]
        results: list[RISResult] = []
        step = self.batch_size
        for start in range(0, len(arrays), step):
            chunk = range(start, min(start + step, len(arrays)))
            results += self._run(
                [arrays[i] for i in chunk], [turns[i] for i in chunk], [texts[i] for i in chunk]
            )
        return results

    def conversation(self, query: Any, *, checked: bool = False) -> list[Turn]:
        """A query or chat history → validated turns, the model's special tokens removed from the user
        text; a plain query becomes ``"Please segment {query}."``.

        Raises:
            InputError: see :func:`~mllm_ris.inference.pipeline.check_query` / ``to_turns``.
        """
        if isinstance(query, str):
            return [Turn(_TEMPLATE.question(self.expression(query, checked=checked), index=0))]
        turns = []
        for i, t in enumerate(to_turns(query)):
            question = self._clean(t.question, self._strip_questions)
            answer = None if t.answer is None else self._clean(t.answer, self._strip_answers)
            if not question or answer == "":
                raise InputError(f"chat history: turn {i} holds only the model's special tokens")
            turns.append(Turn(question, answer))
        return turns

    def expression(self, query: Any, *, checked: bool = False) -> str:
        """A plain query, checked (unless ``checked``) and without the model's special tokens
        (``<image>``, ``[SEG]`` …)."""
        expr = self._clean(query if checked else check_query(query), self._strip_questions)
        if not expr:
            raise InputError("query: holds only the model's special tokens (<image>, [SEG], ...)")
        return expr

    @staticmethod
    def _clean(text: str, specials: Sequence[str]) -> str:
        for token in specials:
            text = text.replace(token, " ")
        return " ".join(text.split())

    def _run(self, images: list[np.ndarray], turns: list[list[Turn]], texts: list[str]) -> list[RISResult]:
        works = [_shrink(image, WORK_SIDE) for image in images]
        with self._lock, torch.inference_mode():
            batch = self._predictor.processor.prepare(works, texts, turns=turns)
            self._check_context(batch)
            preds = self._predictor.run(batch)
        return [
            self._result(p, image, conv, work.shape[:2] != image.shape[:2])
            for p, image, work, conv in zip(preds, images, works, turns, strict=True)
        ]

    def _check_context(self, batch: RISBatch) -> None:
        """Prompt tokens - 1 (``<image>``) + visual tokens + new tokens must fit the LLM's positions."""
        mllm = self.model.mllm
        limit = getattr(mllm.llm.config, "max_position_embeddings", None) if mllm is not None else None
        if limit is None or not isinstance(batch, MLLMBatch) or batch.attention_mask is None:
            return
        if batch.superpixels is not None:
            visual = int(batch.superpixels.amax()) + 1  # labels 0..K-1, -1 on the padding
        else:
            visual = self.model.vision.num_patches if self.model.vision is not None else 0
        lengths = batch.attention_mask.sum(1)  # (B,)
        need = int(lengths.max()) - 1 + visual + self.max_new_tokens
        if need > limit:
            raise InputError(
                f"query too long for the model: {int(lengths.max())} prompt tokens + {visual} visual tokens "
                f"+ {self.max_new_tokens} answer tokens > the LLM's {limit} positions"
            )

    def _result(self, pred: ModelPrediction, image: np.ndarray, conv: list[Turn], scaled: bool) -> RISResult:
        hw = (int(image.shape[0]), int(image.shape[1]))
        text = pred.text if pred.text is not None else ("[SEG]" if len(pred.masks) else "[REJ]")
        out = []
        for mask, score in zip(pred.masks, pred.scores, strict=True):
            if scaled:  # (h, w) at the working size -> (H, W) nearest
                mask = np.asarray(Image.fromarray(mask).resize((hw[1], hw[0]), Image.Resampling.NEAREST))
            box = mask_to_box(mask)
            xywh = [0, 0, 0, 0] if box is None else [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            out.append(Prediction(mask.astype(bool), float(score), encode_rle(mask), xywh, text))
        return RISResult(out, text, float(pred.no_target_prob), hw, conv[-1].question, conv)


# ------------------------------------------------------------------------------------------ helpers


def _is_image_batch(image: Any) -> bool:
    return isinstance(image, (list, tuple))


def _is_query_batch(query: Any) -> bool:
    """A list of strings or of histories is a batch; a list of turns is one history."""
    if not isinstance(query, (list, tuple)) or not query:
        return False
    return all(isinstance(q, str) for q in query) or all(isinstance(q, (list, tuple)) for q in query)


def _as_batch(value: Any, is_batch: bool) -> tuple[list[Any], bool]:
    return (list(value), True) if is_batch else ([value], False)


def _shrink(image: np.ndarray, side: int) -> np.ndarray:
    """``(H, W, 3)`` → at most ``side`` on the longer side (antialiased); smaller images unchanged."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
