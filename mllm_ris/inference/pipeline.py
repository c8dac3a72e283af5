"""RISPipeline: image + query (or chat history) → masks, scores, COCO RLEs, boxes and the answer text.

``RISPipeline.from_pretrained(None)`` loads the bundled default model (or ``$MLLM_RIS_DEFAULT_MODEL``);
any folder written by ``RISModel.save_pretrained`` works. The pipeline validates the inputs
(:mod:`mllm_ris.inference.inputs`; once: ``predict(..., checked=True)`` takes inputs a caller already
checked), turns queries and chat histories into conversations, shrinks large images, hands them to the
model's :class:`~mllm_ris.processing.processor.Processor` (letterbox, superpixels, region descriptors,
chat encoding: the input path of training and evaluation too), runs the batch with
:class:`~mllm_ris.modeling.predictor.RISPredictor` (``RISModel.generate``, ``unletterbox``) and builds
the result types. Nothing here touches the network.

Loading, here too: which model folder (:func:`default_model_path`: ``$MLLM_RIS_DEFAULT_MODEL`` or the
bundled ``mllm_ris/assets/default_model/``, docs/default_model.md), the device and dtype checks
(:func:`check_device`, :func:`as_dtype`) and the model's placement (:func:`place`); the folder checks
are the model folder format's (:mod:`mllm_ris.modeling.model_io`).

Plain queries are asked as the model was trained: ``"Please segment {query}."``; chat-history
questions are used as written.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image

from mllm_ris.errors import CheckpointError, ConfigError, MllmRisError, NotAvailableError
from mllm_ris.inference.inputs import MAX_IMAGE_PIXELS, InputError, check_query, load_image, to_turns
from mllm_ris.inference.results import Prediction, RISResult
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.model_io import DEFAULT_IMAGE_SIZE, check_model_folder, recorded_image_size
from mllm_ris.modeling.predictor import ModelPrediction, RISPredictor
from mllm_ris.processing.masks import encode_rle, mask_to_box
from mllm_ris.processing.processor import QUESTION_TEMPLATES, ChatTemplate, MLLMBatch, RISBatch, Turn

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_MODEL_ENV",
    "WORK_SIDE",
    "Prediction",
    "RISPipeline",
    "RISResult",
    "as_dtype",
    "check_device",
    "default_model_installed",
    "default_model_path",
    "place",
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
            checked: the images are arrays from :func:`~mllm_ris.inference.inputs.load_image` and the
                string queries results of :func:`~mllm_ris.inference.inputs.check_query` (e.g.
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
            InputError: see :func:`~mllm_ris.inference.inputs.check_query` / ``to_turns``.
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
