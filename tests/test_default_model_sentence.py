"""The bundled default model follows the sentence (issue 14, item 7).

On the bundled scenes (``mllm_ris/assets/scenes``), every pair of SynthRef expressions of one scene that
name different objects: each query's mask must overlap its own target more than the other's, for at
least 90 % of the pairs; and no answer may say "no such object" while also giving a ``[SEG]``. The
ground truth is SynthRef's own render of each scene (:func:`scene_references`). A model that returns
one mask per scene (the first bundled model) scores 0 % here.

Set ``MLLM_RIS_DEFAULT_MODEL`` to check another model folder the same way.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from mllm_ris.eval.sentence import follows_pair
from mllm_ris.inference.pipeline import RISPipeline
from mllm_ris.inference.scenes import bundled_scenes, scene_references

FOLLOWS_AT_LEAST = 0.9  # issue 14's target
ABOVE_TEXT_BLIND = 0.1  # a model that returns one mask per scene scores 0


@pytest.fixture(scope="module")
def pipe() -> RISPipeline:
    return RISPipeline.from_pretrained()


def _union(result, hw: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(hw, dtype=bool)
    for pred in result:
        mask |= pred.mask.astype(bool)
    return mask


@pytest.fixture(scope="module")
def follows(pipe: RISPipeline) -> tuple[int, int, list[str]]:
    """``(pairs, followed, misses)`` over every pair of expressions naming different objects of a scene."""
    refs = scene_references()
    images = {s.name: s.path for s in bundled_scenes()}
    predicted: dict[tuple[str, str], np.ndarray] = {}
    for r in refs:
        if (r.scene, r.text) not in predicted:
            predicted[r.scene, r.text] = _union(pipe(images[r.scene], r.text), r.mask.shape)
    pairs = followed = 0
    misses = []
    for a, b in combinations(refs, 2):
        if a.scene != b.scene or a.target == b.target:
            continue
        pa, pb = predicted[a.scene, a.text], predicted[b.scene, b.text]
        ok = follows_pair(pa, pb, a.mask, b.mask)
        pairs, followed = pairs + 1, followed + int(ok)
        if not ok:
            misses.append(f"{a.scene}: {a.text!r} / {b.text!r}")
    return pairs, followed, misses


def test_the_bundled_model_is_not_text_blind(follows: tuple[int, int, list[str]]) -> None:
    pairs, followed, _ = follows
    assert pairs >= 50, f"only {pairs} pairs on the bundled scenes"
    assert followed / pairs >= ABOVE_TEXT_BLIND, f"follows the sentence on {followed}/{pairs} pairs only"


@pytest.mark.xfail(
    strict=True,
    reason="issue 14 not done: the bundled model (2.08 M samples, ~8 CPU hours) follows the sentence on "
    "189 of 223 pairs (85 %); the target is 90 % (docs/default_model.md)",
)
def test_queries_about_different_objects_get_their_own_masks(follows: tuple[int, int, list[str]]) -> None:
    pairs, followed, misses = follows
    rate = followed / pairs
    assert rate >= FOLLOWS_AT_LEAST, (
        f"follows the sentence on {followed}/{pairs} pairs ({rate:.0%} < {FOLLOWS_AT_LEAST:.0%}); "
        f"first misses: {misses[:5]}"
    )


def test_no_answer_says_no_such_object_and_segments(pipe: RISPipeline) -> None:
    for scene in bundled_scenes():
        for text in [q["text"] for q in scene.queries] + list(scene.chat):
            answer = pipe(scene.path, text).answer_text
            assert not ("no such" in answer.lower() and "[SEG]" in answer), (
                f"{scene.name} {text!r}: {answer!r}"
            )
