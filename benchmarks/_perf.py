"""Timing, memory, sample and model helpers shared by the speed / token benchmarks.

Latency is always ``warmup`` untimed calls then ``repeats`` timed ones (CUDA synchronised), reported
as median and inter-quartile range. Peak memory is the process's peak RSS on CPU (glibc's
``malloc_trim`` first hands freed heap back, then Linux ``/proc/self/clear_refs`` resets the high-water
mark, so each measurement is its own and its Δ is the block's working memory) and
``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ROOT, machine, shown

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
TINY_CONFIG = ROOT / "configs" / "model" / "tiny-synth.yaml"
# real photographs shipped with scikit-image (no download needed)
PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip


# ------------------------------------------------------------------------------------- arguments


def common_args(parser: argparse.ArgumentParser) -> None:
    """``--doc``, ``--results``, ``--no-docs``, ``--threads``, ``--quick`` (every script has them)."""
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update (PNGs go to its img/)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    parser.add_argument("--no-docs", action="store_true", help="print only; write no doc, JSON or PNG")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    parser.add_argument("--quick", action="store_true", help="smallest settings (smoke test)")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as it can be re-run from the repository root (``--doc``/``--results`` kept)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in args)])


def set_threads(n: int | None) -> int:
    """Pin torch's intra-op threads (default: every available CPU); returns the count."""
    from _common import nproc

    torch.set_num_threads(n or nproc())
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Seconds of ``repeats`` timed calls: median and quartiles."""

    seconds: list[float]
    median: float = 0.0
    q1: float = 0.0
    q3: float = 0.0

    def __post_init__(self) -> None:
        xs = sorted(self.seconds)
        self.median = statistics.median(xs)
        if len(xs) >= 2:
            self.q1, _, self.q3 = statistics.quantiles(xs, n=4, method="inclusive")
        else:
            self.q1 = self.q3 = xs[0]

    def ms(self) -> str:
        """``"12.3 (11.9–12.8)"``: median and IQR in milliseconds."""
        return f"{1e3 * self.median:.1f} ({1e3 * self.q1:.1f}–{1e3 * self.q3:.1f})"


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device | str = "cpu") -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then time ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return Timing(out)


# ----------------------------------------------------------------------------------------- memory


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: return free heap memory to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Peak:
    """Peak memory of a block, MiB: ``peak`` (absolute) and ``delta`` (over the start)."""

    kind: str  # "RSS" or "CUDA max allocated"
    peak: float = float("nan")
    delta: float = float("nan")


@contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[Peak]:
    """Measure the peak RSS (CPU) or CUDA max allocated memory inside the ``with`` block."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = Peak("CUDA max allocated")
        yield result
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.peak, result.delta = peak / 2**20, (peak - start) / 2**20
        return
    _malloc_trim()  # hand freed heap pages back, so the RSS before is the live memory
    resettable = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        resettable = False
    start_kb = _status_kb("VmRSS") or 0
    result = Peak("RSS" if resettable else "RSS (process lifetime)")
    yield result
    peak_kb = _status_kb("VmHWM") if resettable else None
    if peak_kb is None:  # not Linux: the lifetime peak (KiB on Linux, bytes on macOS)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (
            1024 if sys.platform == "darwin" else 1
        )
    result.peak, result.delta = peak_kb / 1024, (peak_kb - start_kb) / 1024


# ---------------------------------------------------------------------------------------- samples


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as ``(H, W, 3)`` uint8 (grey replicated)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def resized(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` resized (bilinear) so its longer side is ``side``."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def query_sample(image: np.ndarray, text: str = "the astronaut on the left") -> Any:
    """A :class:`RISSample` around ``image`` (no target masks: inference only)."""
    from mllm_ris.data.sample import RISSample

    h, w = image.shape[:2]
    return RISSample(
        image=image, masks=np.zeros((0, h, w), bool), text=text, dataset="bench", split="bench",
        image_id=0, ref_id=0, sent_id=0,
    )  # fmt: skip


def _synthref(root: Path, images: int, size: int, seed: int) -> Any:
    from mllm_ris.data.synthetic import SynthRefDataset, make_synthref

    if not (root / "synthref_meta.json").is_file():
        make_synthref(root, images=images, seed=seed, size=size, workers=1, progress=False)
    return SynthRefDataset(root)


def synthref_samples(root: Path, images: int, *, size: int = 128, seed: int = 0) -> list[Any]:
    """Build (or reuse) a SynthRef set in ``root``; the first ref of each of ``images`` images."""
    ds = _synthref(root, images, size, seed)
    first: dict[Any, int] = {}
    for i, ref in enumerate(ds.refs):
        first.setdefault(ref.image_id, i)
    return [ds[i] for i in list(first.values())[:images]]


def synthref_objects(
    root: Path, images: int, *, size: int = 128, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image, masks (T, H, W))`` per image: every distinct target object of any of its refs."""
    ds = _synthref(root, images, size, seed)
    by_image: dict[Any, tuple[np.ndarray, dict[Any, np.ndarray]]] = {}
    for ref in ds.refs:
        if ref.image_id not in by_image:
            by_image[ref.image_id] = (ds.load_image(ref), {})
        if not ref.no_target:
            objects = by_image[ref.image_id][1]
            for t, m in zip(ref.target_ids, ds.load_masks(ref), strict=True):
                objects.setdefault(t, m)
    out = []
    for image, objects in list(by_image.values())[:images]:
        masks = np.stack(list(objects.values())) if objects else np.zeros((0, *image.shape[:2]), bool)
        out.append((image, masks.astype(bool)))
    return out


# ----------------------------------------------------------------------------------------- models


def build_tiny(kind: str, overrides: Sequence[str] = (), *, device: str = "cpu", seed: int = 0) -> Any:
    """``configs/model/tiny-synth.yaml`` (random weights) with ``model.projector.kind=kind``, eval mode.

    The model is built under ``torch.device(device)`` so large widths are initialised on the device.
    """
    from mllm_ris.config import load_config
    from mllm_ris.modeling.model import build_model

    torch.manual_seed(seed)
    cfg = load_config(TINY_CONFIG, [f"model.projector.kind={kind}", *overrides])
    with torch.device(device):
        model = build_model(cfg.model)
    return model.to(device).eval()


class ForcedAnswer:
    """Makes a random-weight model's greedy decoding emit ``ids`` (a trained model's answer).

    A forward hook on the LM head overwrites the last position's logits, so decoding runs exactly
    ``len(ids)`` steps and yields one ``[SEG]``: the same work as a trained model answering
    "Sure, it is [SEG]." Call :meth:`reset` before each query. The random reject head is switched
    off (``reject_threshold`` null): the forced text alone decides.
    """

    def __init__(self, model: Any) -> None:
        from mllm_ris.processing.processor import answer_text

        model.cfg.reject_threshold = None
        tok = model.mllm.tokenizer
        self.ids = [*tok(answer_text(1), add_special_tokens=False).input_ids, tok.eos_token_id]
        self.step = 0
        self.head = model.mllm.llm.get_output_embeddings()
        self.handle = self.head.register_forward_hook(self._hook)

    def reset(self) -> None:
        self.step = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Without the hook inside the block (plain LM head: e.g. prefill timings, torch.compile)."""
        self.handle.remove()
        try:
            yield
        finally:
            self.handle = self.head.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        tok = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        out = output.clone()
        out[:, -1] = -1e4
        out[:, -1, tok] = 1e4
        return out


# ---------------------------------------------------------------------------------------- records


def device_label(device: torch.device | str) -> str:
    """``machine()`` plus the GPU name on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host {machine()}"
    return machine()


@dataclass
class RunInfo:
    """What every table says about its run."""

    command: str
    device: str
    threads: int
    date: str = field(default_factory=lambda: dt.date.today().isoformat())
    load_before: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))
    torch: str = torch.__version__

    def line(self) -> str:
        """One markdown line naming machine, threads, load, date and the command."""
        return (
            f"Machine: {self.device}; torch {self.torch}, {self.threads} thread(s); "
            f"1-minute load before the run {self.load_before:.2f}; {self.date}. "
            f"Command: `{self.command}`"
        )


def write_json(folder: Path, name: str, record: dict[str, Any]) -> Path:
    """``folder/name.json`` (pretty, trailing newline)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing | Peak | RunInfo):
        return asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(shown(value))
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def image_dir(doc: Path) -> Path:
    """Where a doc's PNG plots go (``img/`` beside it)."""
    return doc.parent / "img"


def agg_pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_ratio(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.2f}"
