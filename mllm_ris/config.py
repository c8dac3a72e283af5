"""One typed config tree for mllm-ris: ``model`` / ``data`` / ``train`` / ``eval``.

YAML files under ``configs/`` only set values; command lines add dotted overrides::

    cfg = load_config("configs/train/synthref.yaml", ["train.lr=1e-4", "data.train.0.root=/data"])

Every value is converted to the field's declared type and checked; a wrong key, type or range
raises :class:`~mllm_ris.errors.ConfigError` whose message starts with the dotted field name
(``train.lr: expected a float, got 'abc'``). Paths default to None and fail clearly when a
command needs them.

The conversion is written here rather than taken from OmegaConf / pydantic: it is ~150 lines,
adds no dependency to the core install, understands ``X | None`` and nested dataclass lists,
and gives the error messages above. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.lora import MLLMConfig
from mllm_ris.modeling.losses import LossConfig
from mllm_ris.modeling.pointer import PointerConfig
from mllm_ris.modeling.projector import ProjectorConfig
from mllm_ris.modeling.superpixels import SuperpixelConfig
from mllm_ris.modeling.vision import VisionTowerConfig
from s2rm_head.head import HeadConfig
from s2rm_head.pixel_encoder import PixelEncoderConfig
from s2rm_head.prompts import PromptConfig
from s2rm_head.sam import SAMConfig
from s2rm_head.text_encoder import TextEncoderConfig

__all__ = [
    "Config",
    "DataConfig",
    "DatasetSpec",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "save_config",
]


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass
class DatasetSpec:
    """One dataset in a mixture."""

    name: str = field(default="synthref", metadata={"help": "loader name (see `mllm-ris data check -h`)"})
    root: str | None = field(default=None, metadata={"help": "dataset root folder (or .jsonl file)"})
    split: str | None = field(default="train", metadata={"help": "split name; null = all splits"})
    split_by: str | None = field(
        default=None, metadata={"help": "refer layout: unc | google | umd | berkeley"}
    )
    weight: float = field(default=1.0, metadata={"help": "sampling ratio in a mixture"})

    def __post_init__(self) -> None:
        from mllm_ris.data.registry import DATASET_NAMES

        _check(self.name in DATASET_NAMES, "name", f"unknown dataset {self.name!r}; one of {DATASET_NAMES}")
        _check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


@dataclass
class ModelConfig:
    """Which model to build.

    ``head.in_channels`` and ``head.lang_dim`` are taken from the built pixel and text encoders
    (``projector.vision_dim`` / ``grid`` / ``llm_dim`` from the built vision tower and LLM), so YAML
    files only choose the parts and their widths. ``text`` is used in classic mode; ``vision``,
    ``superpixels``, ``projector`` and ``mllm`` in mllm mode.
    """

    mode: Literal["classic", "mllm"] = field(
        default="classic", metadata={"help": "classic: text encoder + head; mllm: grounding LLM + head"}
    )
    output_mode: Literal["direct", "sam", "auto", "prior"] = field(
        default="direct",
        metadata={
            "help": "masks from the head, from SAM, per query by predicted IoU, or the region pointer's "
            "painted prior alone (mllm.pointer_dim; the pixel side is not run)"
        },
    )
    checkpoint: str | None = field(default=None, metadata={"help": "weights to start from"})
    reject_threshold: float | None = field(
        default=0.5,
        metadata={
            "help": "mllm generation answers [REJ] when the reject head's no-target probability is above "
            "this (besides the LLM writing [REJ] itself); null = the LLM's text alone decides"
        },
    )
    pixel: PixelEncoderConfig = field(default_factory=PixelEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # mllm mode: image -> vision tower -> projector (+ superpixels) -> grounding LLM -> [SEG] embeddings
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    pointer: PointerConfig = field(default_factory=PointerConfig)  # classic mode's region pointer
    # SAM stage (built when output_mode is sam or auto): prompts from the head -> SAM's mask decoder
    sam: SAMConfig = field(default_factory=SAMConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        t = self.reject_threshold
        _check(t is None or 0.0 < t < 1.0, "reject_threshold", f"must be in (0, 1) or null, got {t}")


@dataclass
class DataConfig:
    """Training / validation data."""

    train: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec(split="train")])
    val: list[DatasetSpec] = field(default_factory=list)
    image_size: int = field(default=128, metadata={"help": "longest image side fed to the model, px"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self) -> None:
        _check(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    output_dir: str | None = field(default=None, metadata={"help": "run folder (checkpoints, logs)"})
    seed: int = 0
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    warmup_steps: int = 0
    pointer_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "mllm with the region pointer: the first N steps train the language side only "
            "(LM, reject, region pointer; no pixel encoder / head / SAM), about 5x faster per step on CPU"
        },
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    lr_schedule: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "decay after warmup (to 0 at max_steps for cosine / linear)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 = off"})
    max_bad_steps: int = field(
        default=5, metadata={"help": "abort after this many optimizer steps in a row with a NaN / inf loss"}
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "'auto' (newest checkpoint in output_dir, if any) or a checkpoint dir"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start fresh in an output_dir that holds checkpoints (deletes them)"}
    )
    time_budget_s: float | None = field(
        default=None, metadata={"help": "stop (and checkpoint) after this many seconds of training"}
    )
    tensorboard: bool = field(default=True, metadata={"help": "log to output_dir/tensorboard if installed"})

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("batch_size", "grad_accum_steps", "max_steps", "log_every", "keep_last"):
            value = getattr(self, name)
            _check(value >= 1, name, f"must be >= 1, got {value}")
        for name in ("warmup_steps", "pointer_warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            _check(value >= 0, name, f"must be >= 0, got {value}")
        _check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _check(self.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
        _check(
            self.time_budget_s is None or self.time_budget_s > 0,
            "time_budget_s",
            f"must be > 0 or null, got {self.time_budget_s}",
        )
        _check(self.resume != "", "resume", "must be 'auto', a checkpoint directory or null")


@dataclass
class EvalConfig:
    """What `mllm-ris eval` measures."""

    dataset: str = "synthref"
    root: str | None = None
    split: str | None = "val"
    split_by: str | None = None
    predictor: Literal["empty", "gt-box"] | None = field(
        default=None, metadata={"help": "a trivial baseline instead of a checkpoint"}
    )
    checkpoint: str | None = None
    output_dir: str | None = field(default=None, metadata={"help": "where metrics.json / metrics.md go"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N samples"})

    def __post_init__(self) -> None:
        from mllm_ris.data.registry import DATASET_NAMES

        _check(
            self.dataset in DATASET_NAMES,
            "dataset",
            f"unknown dataset {self.dataset!r}; one of {DATASET_NAMES}",
        )
        _check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")


@dataclass
class Config:
    """The root of the tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to the declared type ``tp``; raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {_type_name(tp)}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{path}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
            return tuple(_convert(v, args[0], f"{path}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, path)
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def _from_dict(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; fields: {', '.join(names)}"
            raise ConfigError(f"{full}: unknown config field{hint}")
        kwargs[key] = _convert(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ names the field locally (ConfigError or a plain
        # ValueError from s2rm_head, which does not import mllm_ris); add where it lives
        raise ConfigError(f"{path}.{exc}" if path else str(exc)) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready containers (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c = value`` inside nested dicts / lists, creating dicts on the way."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{where}: list index out of range (the list has {len(node)} items)")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"{where}: cannot set a field inside a {type(node).__name__}")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML (``[1, 2]``, ``null``, ``true``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_config(
    path: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Build the config: defaults, then the YAML file(s) in order, then dotted overrides.

    Args:
        path: a YAML file whose top-level keys are a subset of model / data / train / eval, or a
            list of them merged in order (e.g. ``configs/model/tiny-synth.yaml`` then
            ``configs/train/synthref.yaml``): mappings merge, lists and values replace.
        overrides: ``["train.lr=1e-4", "data.train.0.root=/data/coco"]``.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or value out of range.
    """
    tree = config_to_dict(Config())
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for one in paths:
        _merge(tree, _read_yaml(Path(one)))
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return _from_dict(Config, tree, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return loaded


def _merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    """Recursive dict update: mappings merge, everything else (lists included) replaces."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
