"""RISPipeline on a saved model folder: results, batching, chat histories, image kinds, dtypes, errors.

The model is the bundled default model when installed, else a rigged tiny model (test_pipeline_kit)
that answers "Sure, it is [SEG]." to everything; answer-specific checks run only on the rigged one.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from test_pipeline_kit import (
    REJ_ANSWER,
    SEG_ANSWER,
    TEST_SIZE,
    save_model_dir,
    scene_image,
    using_bundled,
    write_png,
)

from mllm_ris.errors import CheckpointError, ConfigError, MllmRisError, NotAvailableError
from mllm_ris.inference import pipeline as pl
from mllm_ris.inference import scenes as sc
from mllm_ris.inference.pipeline import InputError, RISPipeline
from mllm_ris.inference.results import Prediction, RISResult
from mllm_ris.processing.masks import mask_to_box
from mllm_ris.processing.processor import Turn

rigged = pytest.mark.skipif(using_bundled(), reason="answer-specific: runs on the rigged tiny model only")


def _check_result(result: RISResult, hw: tuple[int, int]) -> None:
    assert isinstance(result, RISResult) and result.image_hw == hw and result.answer_text
    assert 0.0 <= result.no_target_prob <= 1.0
    for pred in result:
        assert isinstance(pred, Prediction) and pred.answer_text == result.answer_text
        assert pred.mask.dtype == np.bool_ and pred.mask.shape == hw and isinstance(pred.score, float)
        decoded = mask_utils.decode({"size": pred.rle["size"], "counts": pred.rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), pred.mask)  # the RLE is the mask
        box = mask_to_box(pred.mask)
        assert pred.box == (
            [0, 0, 0, 0] if box is None else [box[0], box[1], box[2] - box[0], box[3] - box[1]]
        )
    json.dumps(result.to_json())  # JSON-ready


def test_single_query(pipe: RISPipeline) -> None:
    assert pipe.image_size == (128 if using_bundled() else TEST_SIZE)  # data.image_size from config.json
    image = scene_image(48, 64)
    result = pipe(image, "the red circle")
    _check_result(result, (48, 64))
    assert result.question == "Please segment the red circle."
    if not using_bundled():
        assert result.answer_text == SEG_ANSWER and len(result) == 1 and result[0].mask.any()
        np.testing.assert_array_equal(result.union_mask(), result[0].mask)


def test_batches_match_single_calls(pipe: RISPipeline) -> None:
    a, b, c = scene_image(48, 64, 0), scene_image(80, 40, 1), scene_image(30, 90, 2)
    singles = [pipe(a, "the red circle"), pipe(b, "the blue square"), pipe(c, "the red circle")]
    batched = pipe([a, b, c], ["the red circle", "the blue square", "the red circle"])
    assert isinstance(batched, list) and len(batched) == 3
    for one, many in zip(singles, batched, strict=True):
        _check_result(many, one.image_hw)
        assert one.answer_text == many.answer_text and len(one) == len(many)
        for p, q in zip(one, many, strict=True):
            assert (p.mask == q.mask).mean() > 0.99  # padding in a batch may move a logit near 0
    assert [r.image_hw for r in pipe([a, b], "the red circle")] == [(48, 64), (80, 40)]
    assert [r.question for r in pipe(a, ["x", "y"])] == ["Please segment x.", "Please segment y."]
    with pytest.raises(InputError, match="2 images but 3 queries"):
        pipe([a, b], ["x", "y", "z"])
    with pytest.raises(InputError, match="empty batch"):
        pipe([], "x")


def test_chat_history_forms_agree(pipe: RISPipeline) -> None:
    image = scene_image()
    turns = [Turn("segment the red circle", "Sure, it is [SEG]."), Turn("and the shape left of it?")]
    dicts = [{"question": t.question, "answer": t.answer} for t in turns]
    messages = [
        {"role": "user", "content": "segment the red circle"},
        {"role": "assistant", "content": "Sure, it is [SEG]."},
        {"role": "user", "content": "and the shape left of it?"},
    ]
    results = [pipe(image, h) for h in (turns, dicts, messages)]
    assert {r.question for r in results} == {"and the shape left of it?"}
    assert len({r.answer_text for r in results}) == 1
    assert len(results[0].turns) == 2 and results[0].turns[0].answer == "Sure, it is [SEG]."
    both = pipe([image, image], [turns, [Turn("segment the blue square")]])  # a batch of histories
    assert [r.question for r in both] == ["and the shape left of it?", "segment the blue square"]
    with pytest.raises(InputError, match="only the last turn may be open"):
        pipe(image, [Turn("a"), Turn("b")])


@rigged
def test_rejecting_model_returns_answer_without_masks(tmp_path: Path) -> None:
    pipe = RISPipeline.from_pretrained(save_model_dir(tmp_path / "rej", REJ_ANSWER))
    result = pipe(scene_image(), "the yellow star")
    assert result.rejected and len(result) == 0 and result.answer_text == REJ_ANSWER
    assert not result.union_mask().any() and result.to_json()["predictions"] == []


def test_image_kinds(pipe: RISPipeline, tmp_path: Path) -> None:
    image = scene_image(40, 60)
    path = write_png(tmp_path / "s.png", image)
    by_path, by_pil, by_array = pipe(path, "x"), pipe(Image.fromarray(image), "x"), pipe(image, "x")
    for r in (by_pil, by_array):
        assert [p.rle for p in r] == [p.rle for p in by_path]
    rgba = np.dstack([image, np.full((40, 60), 128, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 CCW
    Image.fromarray(image).save(tmp_path / "rot.png", exif=exif.tobytes())
    Image.fromarray(image[..., 0].astype(np.uint16) * 250).save(tmp_path / "deep.png")
    inputs = {
        "rgba": (rgba, (40, 60)),
        "grey": (image[..., 0], (40, 60)),
        "float": (image / 255.0, (40, 60)),
        "exif": (tmp_path / "rot.png", (60, 40)),
        "16-bit": (tmp_path / "deep.png", (40, 60)),
        "1x1": (np.full((1, 1, 3), 200, np.uint8), (1, 1)),
        "1x5000": (np.full((1, 5000, 3), 90, np.uint8), (1, 5000)),
    }
    for name, (source, hw) in inputs.items():
        result = pipe(source, "the red circle")
        _check_result(result, hw)
        assert result.answer_text, name


def test_large_images_run_downscaled_with_full_size_masks(pipe: RISPipeline) -> None:
    big = np.asarray(Image.fromarray(scene_image(48, 64)).resize((1600, 1200)))
    result = pipe(big, "the red circle")
    _check_result(result, (1200, 1600))


def test_queries_in_any_script_and_special_tokens(pipe: RISPipeline) -> None:
    image = scene_image()
    for query in ("красный круг", "赤い円", "الدائرة الحمراء", "🔴 the red one", "Ελληνικά"):
        assert pipe(image, query).question == f"Please segment {query}."
    assert pipe(image, "the <image> red [SEG] circle </s>").question == "Please segment the red circle."
    with pytest.raises(InputError, match="special tokens"):
        pipe(image, "<image> [SEG]")
    for bad, fragment in [("", "empty"), ("\t \n", "empty"), ("z" * 10_000, "more than the limit of 1000")]:
        with pytest.raises(InputError, match=fragment):
            pipe(image, bad)
    if not using_bundled():  # 1000 four-byte characters: ~4000 byte-level tokens > the tiny LLM's 2048
        with pytest.raises(InputError, match="query too long for the model"):
            pipe(image, "🔴" * 1000)


def test_dtypes_and_devices(model_dir: Path) -> None:
    image = scene_image()
    ref = RISPipeline.from_pretrained(model_dir)(image, "the red circle")
    for dtype in (torch.bfloat16, "float16"):
        low = RISPipeline.from_pretrained(model_dir, dtype=dtype)
        assert low.model.mllm is None or next(low.model.mllm.llm.parameters()).dtype != torch.float32
        out = low(image, "the red circle")
        _check_result(out, ref.image_hw)
        if not using_bundled():
            assert out.answer_text == ref.answer_text
    with pytest.raises(ConfigError, match="dtype"):
        RISPipeline.from_pretrained(model_dir, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            RISPipeline.from_pretrained(model_dir, device="cuda")
    with pytest.raises(ConfigError, match="device"):
        RISPipeline.from_pretrained(model_dir, device="warp-drive")


def test_loading_never_touches_the_network(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    result = RISPipeline.from_pretrained(model_dir)(scene_image(), "the red circle")
    assert result.answer_text


def test_checkpoint_errors_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "classic").mkdir()
    (tmp_path / "classic" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "classic" / "config.json").write_text("{}")
    cases = {
        tmp_path / "missing": "model folder not found",
        tmp_path / "file.txt": "is a file",
        tmp_path / "empty": "no config.json",
        tmp_path / "classic": "classic-trainer model",
    }
    broken = save_model_dir(tmp_path / "broken")
    (broken / "head.safetensors").write_bytes(b"\x00" * 10)  # truncated
    cases[broken] = "cannot read"
    other = save_model_dir(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["head"]["dim"] = 8  # the weights no longer fit the config
    (other / "config.json").write_text(json.dumps(cfg))
    cases[other] = "head"
    tok = save_model_dir(tmp_path / "tok")
    for f in (tok / "mllm" / "tokenizer").iterdir():
        f.write_text("{not json")
    cases[tok] = "cannot load the model"
    for folder, fragment in cases.items():
        with pytest.raises(CheckpointError) as info:
            RISPipeline.from_pretrained(folder)
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_default_model_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_dir: Path) -> None:
    monkeypatch.delenv(pl.DEFAULT_MODEL_ENV, raising=False)
    monkeypatch.setattr(pl, "_MODEL_DIR", tmp_path / "nothing")
    assert not pl.default_model_installed()
    with pytest.raises(
        NotAvailableError, match=r"the bundled default model is not installed.*docs/default_model\.md"
    ):
        RISPipeline.from_pretrained(None)
    monkeypatch.setenv(pl.DEFAULT_MODEL_ENV, str(tmp_path))
    with pytest.raises(NotAvailableError, match="not a model folder"):
        pl.default_model_path()
    monkeypatch.setenv(pl.DEFAULT_MODEL_ENV, str(model_dir))
    assert pl.default_model_path() == model_dir
    assert RISPipeline.from_pretrained(None).source == str(model_dir)


def test_bundled_scenes_are_valid() -> None:
    scenes = sc.bundled_scenes()
    assert 4 <= len(scenes) <= 6
    for scene in scenes:
        with Image.open(scene.path) as im:
            assert im.size == (128, 128)
        assert scene.path.stat().st_size < 40_000
        assert {q["difficulty"] for q in scene.queries} == {
            "simple",
            "spatial",
            "relational",
            "multi",
            "negative",
        }
        assert len(scene.chat) == 2
    assert issubclass(InputError, MllmRisError)


def test_make_sample_scenes_is_deterministic(tmp_path: Path) -> None:
    a = sc.make_sample_scenes(tmp_path / "a", count=2, seed=3, size=64)
    b = sc.make_sample_scenes(tmp_path / "b", count=2, seed=3, size=64)
    assert [s.queries for s in a] == [s.queries for s in b]
    assert all(x.path.read_bytes() == y.path.read_bytes() for x, y in zip(a, b, strict=True))


def test_pipeline_keeps_the_callers_config_and_caches_superpixels_when_asked(
    model_dir: Path, tmp_path: Path
) -> None:
    """The pipeline leaves ``model.cfg`` alone; its superpixel cache is the processor's, off by default."""
    from mllm_ris.modeling.model import RISModel
    from mllm_ris.modeling.model_io import recorded_image_size

    model, size = RISModel.from_pretrained(model_dir), recorded_image_size(model_dir)
    cfg = model.cfg
    plain = RISPipeline(model, image_size=size)
    cached = RISPipeline(model, image_size=size, superpixel_cache=str(tmp_path / "spx"))
    assert model.cfg is cfg
    image = scene_image()
    assert len(plain(image, "the red circle")) == len(cached(image, "the red circle"))
    if cached._predictor.processor.superpixels is not None:  # a superpixel projector
        assert list((tmp_path / "spx").rglob("*.npy"))


def test_checked_inputs_are_not_checked_again(pipe: RISPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict(..., checked=True)`` (segment.py's way in) runs neither load_image nor check_query."""
    import mllm_ris.inference.pipeline as pipeline_module

    image = scene_image()
    want = pipe(image, "the red circle")
    calls: list[str] = []
    monkeypatch.setattr(pipeline_module, "load_image", lambda *a, **k: calls.append("image"))
    monkeypatch.setattr(pipeline_module, "check_query", lambda *a, **k: calls.append("query"))
    got = pipe.predict([image], ["the red circle"], checked=True)[0]
    assert calls == [] and got.answer_text == want.answer_text
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(got, want, strict=True))
