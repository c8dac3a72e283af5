"""Config tree: YAML + dotted overrides, typed conversion, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_ris.config import Config, load_config, parse_overrides, save_config
from mllm_ris.errors import ConfigError

# accelerate/*.yaml are accelerate's own files, not this tree
CONFIGS = sorted(
    path
    for folder in ("model", "train", "eval")
    for path in (Path(__file__).parents[1] / "configs" / folder).glob("*.yaml")
)


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.train[0].name == "synthref"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


def test_shipped_configs_exist() -> None:
    assert len(CONFIGS) >= 3


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  lr: 3.0e-4\n  batch_size: 4\ndata:\n  train:\n    - {name: refcoco, root: /a}\n"
    )
    cfg = load_config(
        path, ["train.lr=1e-4", "data.train.0.root=/b", "eval.limit=5", "model.checkpoint=null"]
    )
    assert cfg.train.lr == pytest.approx(1e-4)  # "1e-4" is a YAML 1.1 string; converted to float
    assert cfg.train.batch_size == 4
    assert cfg.data.train[0].name == "refcoco"
    assert cfg.data.train[0].root == "/b"
    assert cfg.data.train[0].split == "train"  # default filled in for a partial list item
    assert cfg.eval.limit == 5
    assert cfg.model.checkpoint is None


def test_list_override_replaces_the_list() -> None:
    cfg = load_config(None, ["data.train=[{name: grefcoco, weight: 2}, {name: jsonl, root: x.jsonl}]"])
    assert [d.name for d in cfg.data.train] == ["grefcoco", "jsonl"]
    assert cfg.data.train[0].weight == 2.0


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.max_steps=7", "model.head.name=cmsa"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "train.lrr: unknown config field (did you mean 'lr'?)"),
        (["train.lr=abc"], "train.lr: expected a float, got 'abc'"),
        (["train.lr=-1"], "train.lr: must be > 0"),
        (["train.batch_size=1.5"], "train.batch_size: expected an integer"),
        (["train.batch_size=0"], "train.batch_size: must be >= 1"),
        (["model.mode=llm"], "model.mode: must be one of ['classic', 'mllm']"),
        (["data.train.0.name=coco"], "data.train.0.name: unknown dataset 'coco'"),
        (["data.train.3.root=x"], "data.train.3: list index out of range"),
        (["data.image_size=8"], "data.image_size: must be >= 16"),
        (["eval.predictor=oracle"], "eval.predictor"),
        (["train.lr"], "expected key.sub=value"),
        (["nope.x=1"], "nope: unknown config field"),
        (["model.mllm.lora.rr=4"], "model.mllm.lora.rr: unknown config field (did you mean 'r'?)"),
        (["model.mllm.lora.r=0"], "model.mllm.lora.r: must be >= 1"),
        (["model.mllm.quantization=3bit"], "model.mllm.quantization: must be one of"),
        (["model.projector.kind=tokens"], "model.projector.kind: must be one of"),
        (["model.superpixels.method=quickshift"], "model.superpixels.method: must be one of"),
        (["model.reject_threshold=1.5"], "model.reject_threshold: must be in (0, 1) or null"),
        (["model.loss.no_target_pos_weight=0"], "model.loss.no_target_pos_weight: must be > 0"),
    ],
)
def test_errors_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_parse_overrides_reads_yaml_values() -> None:
    assert parse_overrides(["a=1", "b=null", "c=[1, 2]", "d=true", "e=text"]) == [
        ("a", 1),
        ("b", None),
        ("c", [1, 2]),
        ("d", True),
        ("e", "text"),
    ]


def test_tuple_fields_convert_and_dump() -> None:
    from dataclasses import dataclass

    from mllm_ris.config_tree import config_to_dict
    from mllm_ris.config_tree import from_dict as _from_dict

    @dataclass
    class Widths:
        sizes: tuple[int, ...] = (1, 2)

    assert _from_dict(Widths, {"sizes": [3, 4, 5]}, "model").sizes == (3, 4, 5)
    assert config_to_dict(Widths()) == {"sizes": [1, 2]}
    with pytest.raises(ConfigError, match=r"model\.sizes\.0: expected an integer"):
        _from_dict(Widths, {"sizes": ["q"]}, "model")


def test_several_files_merge_in_order(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text("model: {head: {name: cmsa, dim: 32}}\ntrain: {lr: 0.5}\n")
    train = tmp_path / "train.yaml"
    train.write_text("model: {head: {dim: 48}}\ntrain: {batch_size: 3}\n")
    cfg = load_config([model, train], ["train.lr=0.25"])
    assert cfg.model.head.name == "cmsa" and cfg.model.head.dim == 48
    assert cfg.train.batch_size == 3 and cfg.train.lr == 0.25
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([model, tmp_path / "missing.yaml"])


def test_one_error_hierarchy_for_s2rm_head_and_mllm_ris(tmp_path: Path) -> None:
    """A bad head config (s2rm_head, which imports nothing from mllm_ris), a bad run config, a bad
    loss weight, a missing pretrained folder and a derived width that disagrees are all caught by one
    ``except ConfigError`` (still ValueErrors for callers that caught those)."""
    import s2rm_head.errors
    from mllm_ris.errors import MissingFileError, MllmRisError
    from mllm_ris.modeling.model import build_model
    from s2rm_head.config import HeadConfig
    from s2rm_head.encoders.text import build_text_encoder

    assert ConfigError is s2rm_head.errors.ConfigError and issubclass(ConfigError, ValueError)
    assert issubclass(MissingFileError, ConfigError) and issubclass(MissingFileError, FileNotFoundError)
    failing = [
        lambda: HeadConfig(dim=0),  # s2rm_head's own check
        lambda: load_config(None, ["train.lr=-1"]),  # mllm_ris's config tree
        lambda: load_config(None, ["model.loss.bce=-1"]),  # LossConfig (was a plain ValueError)
        lambda: build_text_encoder(load_config(None, [f"model.text.path={tmp_path / 'none'}"]).model.text),
        lambda: build_model(load_config(None, ["model.text.init=random", "model.head.lang_dim=7"]).model),
    ]
    messages = []
    for make in failing:
        try:
            make()
        except ConfigError as exc:  # one type for every config problem
            assert isinstance(exc, MllmRisError) and isinstance(exc, ValueError)
            messages.append(str(exc))
        else:
            pytest.fail("no ConfigError")
    assert messages[0].startswith("dim: must be >= 1") and messages[1].startswith("train.lr:")
    assert messages[2].startswith("model.loss.bce: loss weights must be >= 0")
    assert "does not exist" in messages[3]
    assert messages[4].startswith("head.lang_dim: 7 disagrees with the text encoder's width")
    assert all("\n" not in m for m in messages)  # one line each: the CLI prints it as it is


def test_derived_widths_are_not_user_facing() -> None:
    """The widths build_parts derives default to null, and no shipped model config sets them."""
    model = load_config(None).model
    derived = {
        "head": ("in_channels", "lang_dim"),
        "projector": ("vision_dim", "llm_dim", "grid"),
        "prompts": ("grounding_dim",),
    }
    for section, names in derived.items():
        assert all(getattr(getattr(model, section), n) is None for n in names), section
    import yaml

    for path in CONFIGS:
        tree = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        for section, names in derived.items():
            assert not set(tree.get(section) or {}) & set(names), f"{path.name}: {section}"
