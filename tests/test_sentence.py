"""The follows-the-sentence check (mllm_ris.eval.sentence): pairs of queries on one image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mllm_ris.data.registry import build_dataset
from mllm_ris.data.sample import RISSample
from mllm_ris.data.synthetic import make_synthref
from mllm_ris.eval.sentence import follows_sentence, sentence_pairs


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synthref")
    make_synthref(out, images=12, seed=3, size=64, workers=1, progress=False)
    return build_dataset("synthref", out, None)


def test_pairs_are_single_targets_of_one_image_with_different_targets(synth) -> None:
    pairs = sentence_pairs(synth)
    assert pairs
    images = set()
    for i, j in pairs:
        a, b = synth[i], synth[j]
        assert a.image_id == b.image_id and a.masks.shape[0] == b.masks.shape[0] == 1
        inter = np.logical_and(a.masks[0], b.masks[0]).sum()
        assert inter / np.logical_or(a.masks[0], b.masks[0]).sum() < 0.5
        images.add(a.image_id)
    assert len(images) == len(pairs)  # one pair per image
    assert len(sentence_pairs(synth, limit=2)) == 2


def test_oracle_follows_and_one_mask_per_image_does_not(synth) -> None:
    pairs = sentence_pairs(synth)
    oracle = follows_sentence(lambda s: s.masks, synth, pairs)
    assert oracle.follows_rate == 1.0 and oracle.same_mask_rate == 0.0
    first: dict[object, np.ndarray] = {}

    def blind(s: RISSample) -> np.ndarray:
        return first.setdefault(s.image_id, s.masks)

    blind_report = follows_sentence(blind, synth, pairs)
    assert blind_report.follows_rate == 0.0 and blind_report.same_mask_rate == 1.0
    empty = follows_sentence(lambda s: np.zeros((0, *s.masks.shape[1:]), bool), synth, pairs)
    assert empty.follows == 0 and empty.same_mask == len(pairs)  # "nothing" for both: the same answer
    assert empty.to_json() == {"pairs": len(pairs), "follows": 0.0, "same_mask": 1.0}


def test_no_pairs(tmp_path: Path) -> None:
    report = follows_sentence(lambda s: s.masks, None, [])  # type: ignore[arg-type]
    assert report.follows_rate is None and report.to_json()["pairs"] == 0
