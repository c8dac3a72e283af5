"""`mllm-ris segment | chat | demo` end to end on the default model (bundled if installed, else the rigged
tiny one through $MLLM_RIS_DEFAULT_MODEL), and the bad-input contract: one line on stderr, exit 2,
no output files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_kit import png_header, scene_image, write_png

from mllm_ris.cli import main
from mllm_ris.inference import pipeline as pl
from mllm_ris.inference import results
from mllm_ris.inference import scenes as sc

ERR = "mllm-ris: error: "


@pytest.fixture(autouse=True)
def _default_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pl.DEFAULT_MODEL_ENV, str(model_dir))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return write_png(tmp_path / "scene.png", scene_image(48, 64))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_segment_writes_mask_overlay_and_json(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["segment", str(image), "красный круг", "--out", str(out)]) == 0
    assert _files(out) == ["scene.json", "scene_mask.png", "scene_overlay.png"]
    stdout = capsys.readouterr().out
    assert stdout.startswith("answer: ") and f"wrote {out / 'scene_mask.png'}" in stdout
    record = json.loads((out / "scene.json").read_text(encoding="utf-8"))
    assert record["query"] == "красный круг" and record["image"] == str(image)
    assert record["answer"] and (record["height"], record["width"]) == (48, 64)
    for pred in record["predictions"]:
        assert pred["rle"]["size"] == [48, 64] and len(pred["box"]) == 4 and 0 <= pred["area"] <= 48 * 64
    mask = np.asarray(Image.open(out / "scene_mask.png"))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    assert (mask > 0).sum() == sum(p["area"] for p in record["predictions"]) or len(record["predictions"]) > 1
    with Image.open(out / "scene_overlay.png") as overlay:
        assert overlay.size == (64, 48) and overlay.mode == "RGB"


def test_segment_twice_into_one_folder_keeps_both(image: Path, tmp_path: Path) -> None:
    """A second query about the same image writes ``scene_2_*``: the first answer's files stay."""
    out = tmp_path / "out"
    assert main(["segment", str(image), "the red circle", "--out", str(out)]) == 0
    assert main(["segment", str(image), "the blue square", "--out", str(out)]) == 0
    stems = ("scene", "scene_2")
    assert _files(out) == sorted(f"{s}{x}" for s in stems for x in (".json", "_mask.png", "_overlay.png"))
    queries = [json.loads((out / f"{s}.json").read_text(encoding="utf-8"))["query"] for s in stems]
    assert queries == ["the red circle", "the blue square"]


def test_segment_batch(image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = write_png(tmp_path / "other.png", scene_image(30, 70, seed=3))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lines = [
        {"image": "scene.png", "query": "the red circle"},  # relative to the JSONL file
        {"image": str(other), "query": "the blue square", "id": "blue"},
        {"image": "broken.png", "query": "the red circle"},
        {"image": "scene.png", "query": "   "},
        {"image": "scene.png", "query": "the circle on the left"},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n# a comment\nnot json\n")
    out = tmp_path / "out"
    assert main(["segment", "--batch", str(batch), "--out", str(out), "--batch-size", "2"]) == 2
    captured = capsys.readouterr()
    stems = ["0001_scene", "0005_scene", "blue"]
    assert _files(out) == sorted(
        f"{s}{suffix}" for s in stems for suffix in (".json", "_mask.png", "_overlay.png")
    )
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith(ERR) for e in errors)
    assert any("line 3: cannot read image" in e for e in errors) and any(
        "line 4: query: empty" in e for e in errors
    )
    assert any("line 8: not valid JSON" in e for e in errors)
    assert "3 segmented, 3 failed" in captured.out
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(lines[0]) + "\n")
    assert main(["segment", "--batch", str(good), "--out", str(tmp_path / "out2")]) == 0


def test_demo_writes_overlays_and_gallery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    scenes = sc.bundled_scenes()
    answers = sum(len(s.queries) + len(s.chat) for s in scenes)
    assert f"{answers} answers on the bundled scenes; open {out / 'index.html'}" in capsys.readouterr().out
    page = (out / "index.html").read_text(encoding="utf-8")
    overlays = sorted(out.glob("*_overlay.png"))
    assert len(overlays) == answers and len(list(out.glob("*.json"))) == answers
    for path in overlays:
        assert f'src="{path.name}"' in page
    for scene in scenes:
        assert (out / scene.path.name).is_file() and scene.queries[0]["text"] in page
    assert "http" not in page.replace(pl.default_model_path().as_posix(), "")  # self-contained


def test_chat_reads_stdin_in_process(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = (
        "segment the red circle\n\nand the shape left of it?\n"
        + "q" * 2000
        + "\nreset\nwhere?\nquit\nnot read\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(questions))
    out = tmp_path / "chat"
    assert main(["chat", str(image), "--out", str(out)]) == 2  # one question was refused
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith(f"chat about {image} (64x48)")
    assert [line.split(" ")[0] for line in lines[1:]] == ["[1]", "[2]", "(conversation", "[3]"]
    assert captured.err.strip().splitlines() == [
        f"{ERR}question: 2000 characters, more than the limit of 1000"
    ]
    second = json.loads((out / "scene_turn2.json").read_text())
    assert second["question"] == "and the shape left of it?"
    assert [t["question"] for t in second["history"]] == ["segment the red circle"]
    assert json.loads((out / "scene_turn3.json").read_text())["history"] == []  # after reset
    assert len(list(out.glob("*_overlay.png"))) == 3


def test_chat_through_a_real_pipe(image: Path, tmp_path: Path, model_dir: Path) -> None:
    env = {**os.environ, pl.DEFAULT_MODEL_ENV: str(model_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "mllm_ris.cli", "chat", str(image), "--out", str(tmp_path / "c")],
        input="segment the red circle\nand the shape left of it?\n",  # EOF ends the session
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1] answer: " in proc.stdout and "[2] answer: " in proc.stdout
    assert proc.stderr == "", proc.stderr  # nothing else on stderr (no progress bars, no warnings)
    assert len(list((tmp_path / "c").glob("*_overlay.png"))) == 2


def _bad_cases(tmp: Path, image: Path) -> dict[str, tuple[list[str], str]]:
    good = Image.open(image)
    buf = io.BytesIO()
    good.save(buf, format="PNG")
    (tmp / "truncated.png").write_bytes(buf.getvalue()[:200])
    (tmp / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (tmp / "classic").mkdir()
    (tmp / "classic" / "model.safetensors").write_bytes(b"x")
    (tmp / "a_file").write_text("x")
    img = str(image)
    return {
        "truncated": (["segment", str(tmp / "truncated.png"), "x"], "cannot read image"),
        "random bytes": (["segment", str(tmp / "random.jpg"), "x"], "not an image format Pillow can decode"),
        "bomb": (["segment", str(tmp / "bomb.png"), "x"], "decompression bomb"),
        "missing image": (["segment", str(tmp / "nope.png"), "x"], "image not found"),
        "empty query": (["segment", img, "  "], "query: empty"),
        "long query": (["segment", img, "w" * 10_000], "10000 characters, more than the limit of 1000"),
        "missing model": (["segment", img, "x", "--model", str(tmp / "none")], "model folder not found"),
        "classic model": (["segment", img, "x", "--model", str(tmp / "classic")], "classic-trainer model"),
        "out is a file": (["segment", img, "x", "--out", str(tmp / "a_file")], "is not a folder"),
        "no query": (["segment", img], "needs IMAGE and QUERY"),
        "both": (["segment", img, "x", "--batch", "b.jsonl"], "not both"),
        "missing batch": (["segment", "--batch", str(tmp / "b.jsonl")], "cannot read"),
        "bad dtype device": (["segment", img, "x", "--device", "cuda:7"], "device"),
        "chat bad image": (["chat", str(tmp / "random.jpg")], "cannot read image"),
        "demo model missing": (["demo", "--model", str(tmp / "none")], "model folder not found"),
    }


def test_bad_input_is_one_line_exit_2_and_no_outputs(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("the device case expects a machine without CUDA")
    for name, (argv, fragment) in _bad_cases(tmp_path, image).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        if "--out" not in argv and argv[0] in ("segment", "chat", "demo"):
            argv = [*argv, "--out", str(out)]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(ERR) and err.count("\n") == 1 and fragment in err, (name, err)
        assert _files(out) == [], name
    monkeypatch.setenv(pl.DEFAULT_MODEL_ENV, "")
    monkeypatch.setattr(pl, "_MODEL_DIR", tmp_path / "not_installed")
    assert main(["segment", str(image), "x", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"{ERR}the bundled default model is not installed")
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "not installed" in capsys.readouterr().err and _files(tmp_path / "d") == []


def test_a_failed_write_leaves_no_files(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_replace, calls = os.replace, []

    def flaky_replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", flaky_replace)
    out = tmp_path / "out"
    assert main(["segment", str(image), "x", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"{ERR}cannot write {out / 'scene_mask.png'}: No space left on device\n"
    assert _files(out) == []  # the renamed mask was removed again, the temporaries too
