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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mllm_ris.config_tree import (
    check,
    config_to_dict,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    set_dotted,
)
from mllm_ris.data.registry import DATASET_NAMES
from mllm_ris.modeling.model_config import ModelConfig

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
        check(self.name in DATASET_NAMES, "name", f"unknown dataset {self.name!r}; one of {DATASET_NAMES}")
        check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """Training / validation data."""

    train: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec(split="train")])
    val: list[DatasetSpec] = field(default_factory=list)
    image_size: int = field(default=128, metadata={"help": "longest image side fed to the model, px"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self) -> None:
        check(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


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
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("batch_size", "grad_accum_steps", "max_steps", "log_every", "keep_last"):
            value = getattr(self, name)
            check(value >= 1, name, f"must be >= 1, got {value}")
        for name in ("warmup_steps", "pointer_warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            check(value >= 0, name, f"must be >= 0, got {value}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.max_bad_steps >= 1, "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
        check(
            self.time_budget_s is None or self.time_budget_s > 0,
            "time_budget_s",
            f"must be > 0 or null, got {self.time_budget_s}",
        )
        check(self.resume != "", "resume", "must be 'auto', a checkpoint directory or null")


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
        check(
            self.dataset in DATASET_NAMES,
            "dataset",
            f"unknown dataset {self.dataset!r}; one of {DATASET_NAMES}",
        )
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")


@dataclass
class Config:
    """The root of the tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
        merge(tree, read_yaml(Path(one)))
    for key, value in parse_overrides(overrides):
        set_dotted(tree, key, value)
    return from_dict(Config, tree, "")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
