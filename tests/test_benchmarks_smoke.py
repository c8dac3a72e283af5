"""Every benchmark script runs end to end with its smallest settings (``--quick``) into a temporary doc.

The scripts live in ``benchmarks/`` and import their helpers as top-level modules, so that folder goes on
``sys.path``; each ``main(argv)`` runs in this process (one torch import for all), pinned to one thread.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, tmp_path: Path, *extra: str) -> str:
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module(script)
        doc = tmp_path / "docs" / "benchmarks.md"
        results = str(tmp_path / "results")
        argv = ["--quick", "--threads", "1", "--doc", str(doc), "--results", results, *extra]
        assert module.main(argv) == 0
    finally:
        sys.path.remove(str(BENCH))
    return doc.read_text(encoding="utf-8")


def _json(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "results" / f"{name}.json").read_text(encoding="utf-8"))


def _save_presence_model(folder: Path) -> None:
    """A seeded random tiny mllm model, output mode prior, whose reject decision is the pointer's
    presence query, saved to ``folder``."""
    import torch
    from test_model_kit import tiny_cfg

    from mllm_ris.modeling.model import build_model

    torch.manual_seed(0)
    overrides = (
        "model.mllm.pointer_dim=16",
        "model.mllm.reject_from=pointer",
        "model.projector.descriptors=true",
    )
    build_model(tiny_cfg("mllm", "prior", *overrides)).save_pretrained(folder)


def test_bench_tokens(tmp_path: Path) -> None:
    text = _run("bench_tokens", tmp_path)
    assert "<!-- bench_tokens:begin -->" in text and "Visual tokens per image" in text
    assert "python benchmarks/bench_tokens.py --quick" in text and "CPUs" in text
    record = _json(tmp_path, "tokens")
    row = record["synthref"]["slic (default)"]
    assert row["images"] == 2 and 1 <= row["max"] <= 51 and 0.0 <= row["object_iou"] <= 1.0
    assert (tmp_path / "docs" / "img" / "tokens_per_image.png").stat().st_size > 1000


def test_bench_superpixels(tmp_path: Path) -> None:
    text = _run("bench_superpixels", tmp_path)
    assert "Superpixel generation cost" in text and "cache hit" in text
    rows = _json(tmp_path, "superpixels")["rows"]
    assert any(k.startswith("slic") for k in rows) and any(k.startswith("sam (tiny") for k in rows)
    assert all(r["stats"]["hits"] >= 1 and r["stats"]["misses"] == r["images"] for r in rows.values())


def test_bench_latency(tmp_path: Path) -> None:
    text = _run("bench_latency", tmp_path, "--sizes", "64,96", "--counts", "4,16")
    assert "<!-- bench_latency_tiny_cpu:begin -->" in text and "<!-- bench_scaling_cpu:begin -->" in text
    record = _json(tmp_path, "latency_tiny_cpu")
    for kind in ("superpixel", "patch"):  # the forced answer gives one [SEG] and one mask
        assert record["query"][kind]["text"] == "Sure, it is [SEG]." and record["query"][kind]["masks"] == 1
    assert record["query"]["patch"]["tokens"] == 1024 and record["query"]["superpixel"]["tokens"] <= 48
    prefill = record["prefill"]["sdpa | off | 1"]
    assert [r["seq"] for r in prefill.values()][-1] == record["text_tokens"] + 1024
    assert (tmp_path / "docs" / "img" / "latency_scaling_cpu.png").is_file()


def test_bench_train_speed(tmp_path: Path) -> None:
    text = _run("bench_train_speed", tmp_path)
    assert "Training throughput" in text and "Accuracy at equal training budget" in text
    kinds = _json(tmp_path, "train_speed_cpu")["kinds"]
    assert kinds["patch"]["tokens_mean"] == 1024 and kinds["superpixel"]["tokens_mean"] < 1024
    assert all(k["samples_per_s"] > 0 for k in kinds.values())


def test_bench_pointer_probe(tmp_path: Path) -> None:
    """The GRU + descriptor pointer reference trains on a tiny SynthRef and writes its curve."""
    from mllm_ris.data.synthetic import make_synthref

    data = tmp_path / "synthref"
    make_synthref(data, images=12, seed=3, size=128, workers=1, progress=False)
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("bench_pointer_probe")
        argv = [
            "--data",
            str(data),
            "--cache-dir",
            str(tmp_path / "sp"),
            "--minutes",
            "0.02",
            "--train",
            "40",
            "--held",
            "12",
            "--batch",
            "8",
        ]
        assert module.main([*argv, "--eval-every", "2", "--results", str(tmp_path / "results")]) == 0
        # the MLLM path: the model's grounding LLM + pointer over descriptor tokens / its own projector
        for regions in ("descriptors", "projector"):
            extra = ["--query", "mllm", "--regions", regions, "--tag", regions, "--max-samples", "16"]
            extra += ["--schedule", "cosine", "--lm", "0.5"]
            assert module.main([*argv, *extra, "--results", str(tmp_path / "results")]) == 0
    finally:
        sys.path.remove(str(BENCH))
    record = _json(tmp_path, "pointer_probe_L2_b8")
    assert record["train_expressions"] == 40 and 1 <= record["held_expressions"] <= 12
    assert record["steps"] >= 1 and 0.0 <= record["final"]["all"]["top1"] <= 1.0
    assert record["curve"] and record["curve"][0]["samples"] == 16
    for regions in ("descriptors", "projector"):
        mllm = _json(tmp_path, f"pointer_probe_L2_b8_mllm_cosine_{regions}")
        assert mllm["query"] == "mllm" and mllm["regions"] == regions and mllm["steps"] == 2
        assert 0.0 <= mllm["final"]["all"]["top1"] <= 1.0 and "--regions " + regions in mllm["command"]


def test_diag_pointer_scores_a_saved_pointer_model(tmp_path: Path) -> None:
    """Teacher-forced top-1 of a (random) pointer model: a rate per level; a model without a pointer
    is refused in one line."""
    import pytest
    import torch
    from test_model_kit import SIZE, tiny_cfg

    from mllm_ris.data.synthetic import make_synthref
    from mllm_ris.modeling.model import build_model

    data = tmp_path / "synthref"
    make_synthref(data, images=12, seed=3, size=SIZE, workers=1, progress=False)
    torch.manual_seed(0)
    model = build_model(tiny_cfg("mllm", "direct", "model.mllm.pointer_dim=16"))
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("diag_pointer")
        top1 = module.pointer_top1(model, data, limit=8, image_size=SIZE)
        assert set(top1) >= {"all"} and all(0.0 <= v <= 1.0 for v in top1.values())
        with pytest.raises(SystemExit, match="no region pointer"):
            module.pointer_top1(build_model(tiny_cfg("mllm", "direct")), data, limit=2, image_size=SIZE)
    finally:
        sys.path.remove(str(BENCH))


def test_pointer_bisect_trains_on_the_tasks_batches(tmp_path: Path) -> None:
    """The trainer's batches and loss, precomputed, a knob changed (here: no reject loss, single-target
    samples only): it trains, checks the teacher-forced top-1 and records the command."""
    from mllm_ris.data.synthetic import make_synthref

    data = tmp_path / "synthref"
    make_synthref(data, images=12, seed=3, size=128, workers=1, progress=False)
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("pointer_bisect")
        argv = ["--data", str(data), "--cache-dir", str(tmp_path / "sp"), "--samples", "16", "--batch", "8"]
        argv += ["--max-samples", "16", "--eval-every", "8", "--limit", "4", "--single-only", "--tag", "t"]
        argv += ["--set", "model.loss.no_target=0", "--results", str(tmp_path / "results")]
        assert module.main(argv) == 0
    finally:
        sys.path.remove(str(BENCH))
    record = _json(tmp_path, "pointer_bisect_t")
    assert record["samples_seen"] == 16 and len(record["curve"]) == 2 and record["single_only"]
    assert 0.0 <= record["final"]["all"] <= 1.0 and record["curve"][0]["terms"]["no_target"] == 0.0
    assert "--set model.loss.no_target=0" in record["command"]


def test_bench_negative_forms_reports_n_acc_per_form(tmp_path: Path) -> None:
    """Negatives relabelled by form beside present expressions, evaluated with a saved (random) model
    whose reject decision is the pointer's; one results JSON with a level per negative form."""
    from test_model_kit import SIZE

    from mllm_ris.data.synthetic import make_synthref

    data = tmp_path / "synthref"
    make_synthref(
        data, images=16, seed=3, size=SIZE, workers=1, progress=False, negative_forms=["attr", "relational"]
    )
    _save_presence_model(tmp_path / "m")
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("bench_negative_forms")
        argv = ["--data", str(data), "--split", "all", "--model", f"tiny={tmp_path / 'm'}"]
        assert (
            module.main([*argv, "--negatives", "8", "--positives", "4", "--results", str(tmp_path / "r")])
            == 0
        )
    finally:
        sys.path.remove(str(BENCH))
    levels = json.loads((tmp_path / "r" / "negative_forms_tiny.json").read_text())["levels"]
    negatives = {level for level in levels if level.startswith("negative")}
    assert negatives and negatives <= {"negative-attr", "negative-relational"}
    assert sum(m["samples"] for m in levels.values()) == 12


def test_diag_answers_classifies_generated_answers(tmp_path: Path) -> None:
    """Generated answers of a saved (random) pointer model with the presence query: class counts per
    query form (from the build's own queries) and group instance rates, in one JSON; the classes
    themselves on hand-made region sets."""
    from test_model_kit import SIZE

    from mllm_ris.data.synthetic import make_synthref

    data = tmp_path / "synthref"
    make_synthref(data, images=12, seed=3, size=SIZE, workers=1, progress=False)
    _save_presence_model(tmp_path / "m")
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("diag_answers")
        out = tmp_path / "r" / "answers.json"
        argv = ["--data", str(data), "--model", str(tmp_path / "m"), "--limit", "24", "--results", str(out)]
        assert module.main([*argv, "--no-complete-groups"]) == 0
        assert module.answer_class([{1, 2}], [{1}, {2}]) == "exact"
        assert module.answer_class([{1}], [{1, 3}]) == "extra"
        assert module.answer_class([{1}], [{2}]) == "wrong"
        assert module.answer_class([], []) == "rejected" and module.answer_class([{1}], []) == "no_answer"
        assert module.instances_found([{1}, {2, 3}], [{2, 3}, {2, 3}, {1}]) == 2
    finally:
        sys.path.remove(str(BENCH))
    result = json.loads(out.read_text())
    assert result["complete_groups"] is False and result["limit"] == 24
    from mllm_ris.data.registry import build_dataset

    assert sum(c["n"] for c in result["forms"].values()) == min(
        24, len(build_dataset("synthref", data, "val"))
    )
    assert set(result["forms"]) <= {
        "simple",
        "multi",
        "spatial:best",
        "spatial:second",
        "spatial:size",
        "relational:1",
        "relational:2",
        "negative:attr",
    }
    assert 0.0 <= result["groups"]["instance_recall"] <= 1.0


def test_calibrate_reject_sweeps_and_writes_the_threshold(tmp_path: Path) -> None:
    """The sweep's rates on hand-made probabilities, the balanced choice (ties nearest 0.5), and a run
    on a saved (random) model that writes its choice into config.json and nothing else."""
    from test_model_kit import SIZE

    from mllm_ris.data.synthetic import make_synthref

    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("calibrate_reject")
        rows = module.sweep([0.9, 0.3, 0.05, 0.6], [True, True, False, False], thresholds=(0.2, 0.5))
        assert rows[0] == {"threshold": 0.2, "n_acc": 1.0, "t_acc": 0.5, "balanced": 0.75}
        assert rows[1] == {"threshold": 0.5, "n_acc": 0.5, "t_acc": 0.5, "balanced": 0.5}
        assert module.choose(rows) == 0.2
        tie = [{"threshold": t, "n_acc": 1.0, "t_acc": 1.0, "balanced": 1.0} for t in (0.1, 0.4, 0.7)]
        assert module.choose(tie) == 0.4
        data = tmp_path / "synthref"
        make_synthref(data, images=16, seed=3, size=SIZE, workers=1, progress=False)
        _save_presence_model(tmp_path / "m")
        before = json.loads((tmp_path / "m" / "config.json").read_text())
        argv = [
            "--data",
            str(data),
            "--model",
            str(tmp_path / "m"),
            "--write",
            "--results",
            str(tmp_path / "r.json"),
        ]
        assert module.main(argv) == 0
    finally:
        sys.path.remove(str(BENCH))
    record = json.loads((tmp_path / "r.json").read_text())
    after = json.loads((tmp_path / "m" / "config.json").read_text())
    assert after["model"].pop("reject_threshold") == record["chosen"] in module.THRESHOLDS
    before["model"].pop("reject_threshold")
    assert after == before


def test_align_regions_writes_a_model_to_start_from(tmp_path: Path) -> None:
    """The region encoder learns the captions' embeddings; the folder loads as a RISModel."""
    from mllm_ris.data.synthetic import make_synthref
    from mllm_ris.modeling.model import RISModel

    data = tmp_path / "synthref"
    make_synthref(data, images=12, seed=3, size=64, workers=1, progress=False)
    root = BENCH.parent / "configs" / "model"
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("align_regions")
        argv = ["--data", str(data), "--out", str(tmp_path / "aligned"), "--images", "6", "--val-images", "2"]
        argv += ["--epochs", "5", "--image-size", "64", "--model", str(root / "tiny-synth.yaml")]
        argv += ["--model", str(root / "tiny-synth-pointer.yaml")]
        assert module.main(argv) == 0
    finally:
        sys.path.remove(str(BENCH))
    record = json.loads((tmp_path / "aligned" / "alignment.json").read_text())
    assert record["regions"] > 6 and 0.0 <= record["after"]["all"] <= 1.0
    assert RISModel.from_pretrained(tmp_path / "aligned").projector.desc_mlp is not None


def test_bench_refiners_compares_prior_refined_and_oracle(tmp_path: Path) -> None:
    """A refiner at initialisation (residual scale 0) returns its prior exactly: ``refined`` equals
    ``prior`` and ``oracle+head`` equals ``oracle`` (the superpixel ceiling, ≥ the prior); a model
    without a head is refused in one line."""
    import pytest
    import torch
    from test_model_kit import SIZE, tiny_cfg

    from mllm_ris.data.synthetic import make_synthref
    from mllm_ris.modeling.model import build_model

    data = tmp_path / "synthref"
    make_synthref(data, images=12, seed=3, size=SIZE, workers=1, progress=False)
    torch.manual_seed(0)
    pointer = ("model.mllm.pointer_dim=16", "model.projector.descriptors=true")
    model = build_model(tiny_cfg("mllm", "direct", *pointer, "model.head.prior_input=true"))
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("bench_refiners")
        gain = module.refine_gain(model, data, limit=8, image_size=SIZE)
        assert gain["refined"] == gain["prior"] and gain["oracle+head"] == gain["oracle"]
        assert gain["oracle"]["all"]["ciou"] >= gain["prior"]["all"]["ciou"] and gain["prior"]["all"]["n"] > 0
        with pytest.raises(SystemExit, match="needs a region pointer and a head"):
            module.refine_gain(
                build_model(tiny_cfg("mllm", "prior", *pointer)), data, limit=2, image_size=SIZE
            )
    finally:
        sys.path.remove(str(BENCH))


def test_bench_classic_pointer_prepares_and_trains(tmp_path: Path) -> None:
    """``prepare`` saves the pointer's inputs of a split; ``train`` (MiniLM words, the GRU text side from
    scratch, the pointer's presence head with the shape and image CNNs) evaluates them into a learning
    curve of cIoU / N-acc in [0, 100]."""
    from mllm_ris.data.synthetic import make_synthref

    data = tmp_path / "synthref"
    make_synthref(data, images=10, seed=3, size=64, workers=1, progress=False)
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("bench_classic_pointer")
        for split in ("train", "val"):
            out = tmp_path / f"{split}.pt"
            assert module.main(["prepare", "--data", str(data), "--split", split, "--out", str(out)]) == 0
        common = [
            "--train",
            str(tmp_path / "train.pt"),
            "--val",
            str(tmp_path / "val.pt"),
            "--data",
            str(data),
        ]
        common += ["--samples", "16", "--eval-every", "8", "--batch", "4", "--results", str(tmp_path / "res")]
        head = ["--set", "model.pointer.presence=true", "--set", "model.projector.descriptor_encoder=conv"]
        head += ["--set", "model.projector.image_encoder=cnn"]  # the image CNN reads the prepared images
        variants = (
            ("minilm", []),
            ("gru", ["--text", "gru", "--norm", "--ce", "1", "--presence"]),
            ("head", [*head, "--presence-detach"]),
        )
        for name, extra in variants:
            assert module.main(["train", name, *common, *extra]) == 0
            record = json.loads(
                (tmp_path / "res" / f"classic_pointer_{name}.json").read_text(encoding="utf-8")
            )
            assert record["command"].startswith("python benchmarks/bench_classic_pointer.py train " + name)
            assert [r["samples"] for r in record["curve"]] == [8, 16]
            last = record["curve"][-1]
            assert 0.0 <= last["overall"] <= 100.0 and 0.0 <= last["train"] <= 100.0
    finally:
        sys.path.remove(str(BENCH))
