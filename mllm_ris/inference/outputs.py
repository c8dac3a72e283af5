"""Writing results to disk atomically: ``<stem>_mask.png``, ``<stem>_overlay.png``, ``<stem>.json``.

Everything is encoded in memory first, then each file is written to a temporary name in the output
folder and renamed, so an error (a full disk, an interrupt) never leaves a half-written file under
a final name; a failure while writing a set removes the files of that set already renamed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mllm_ris.inference.inputs import InputError
from mllm_ris.inference.render import mask_image, overlay
from mllm_ris.inference.results import RISResult

__all__ = ["OutputFiles", "ensure_out_dir", "result_record", "write_atomic", "write_result_files"]


@dataclass(frozen=True)
class OutputFiles:
    """The three files of one result."""

    mask: Path
    overlay: Path
    json: Path

    def __iter__(self) -> Iterator[Path]:
        return iter((self.mask, self.overlay, self.json))


def ensure_out_dir(path: str | Path) -> Path:
    """Create the output folder (and parents).

    Raises:
        InputError: it exists as a file, or cannot be created.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    return out


def write_atomic(files: dict[Path, bytes]) -> None:
    """Write every ``path: content`` via a temporary file in the same folder and a rename; on any error,
    remove the temporaries and the files of this call already renamed, then raise ``InputError``."""
    tmps: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmps[path] = Path(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
            done.append(path)
    except BaseException as exc:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        for path in done:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {next(iter(files), '')}: {exc.strerror or exc}") from None
        raise


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def result_record(result: RISResult, **extra: Any) -> dict[str, Any]:
    """The JSON written for a result: ``extra`` fields (image, query, model …) then ``result.to_json()``."""
    return {**extra, **result.to_json()}


def write_result_files(
    out_dir: Path, stem: str, pixels: np.ndarray, result: RISResult, record: Mapping[str, Any] | None = None
) -> OutputFiles:
    """Write the mask PNG (255 = any mask), the overlay PNG and the JSON (RLEs, scores, answer) of one
    result, atomically (see the module docstring).

    Args:
        out_dir: an existing folder.
        stem: file name stem (``<stem>_mask.png`` …).
        pixels: ``(H, W, 3)`` uint8, the image the result is about.
        record: fields put first in the JSON (e.g. ``image``, ``query``, ``model``).
    """
    files = OutputFiles(
        out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png", out_dir / f"{stem}.json"
    )
    data = result_record(result, **(record or {}))
    contents = {
        files.mask: _png(mask_image(result)),
        files.overlay: _png(overlay(pixels, result)),
        files.json: (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
    }
    write_atomic(contents)
    return files
