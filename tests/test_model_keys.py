"""The state-dict keys of a tiny model of each kind stay as recorded: saved model folders, the bundled
model, training checkpoints and external tools read keys such as ``mllm.``, ``projector.``,
``text_encoder.``, ``pointer.``, ``vision.``, ``head.``, ``pixel_encoder.``, ``sam_stage.``; the parts
are registered on :class:`RISModel` under those names, in this order, whatever composes them (the query
source, which also checks its parts)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from test_model_kit import tiny_cfg

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.model_build import LLMQueries, TextQueries, build_parts

CP = ("model.pointer.dim=16", "model.projector.descriptors=true", "model.projector.tower=false")
NO_TOWER = ("model.projector.tower=false", "model.projector.descriptors=true")
KINDS = {  # name: (mode, output mode, *overrides)
    "classic": ("classic", "direct"),
    "classic_sam": ("classic", "sam"),
    "classic_pointer": ("classic", "direct", *CP),
    "classic_pointer_prior": ("classic", "prior", *CP),
    "mllm": ("mllm", "direct"),
    "mllm_auto": ("mllm", "auto"),
    "mllm_pointer_prior": ("mllm", "prior", "model.mllm.pointer_dim=16"),
    "mllm_no_tower": ("mllm", "direct", *NO_TOWER),
}
TEXT, PROJ, PIX, SAM = "text_encoder", "projector", "pixel_encoder", ("sam_stage", "prompt_builder")
RECORDED = {  # name: (registered parts in order, number of keys, sha256 of the keys in order, 16 hex)
    "classic": ((TEXT, PIX, "head"), 255, "f45663eaa2251fa2"),
    "classic_sam": ((TEXT, PIX, "head", *SAM), 433, "32c91d5ff2c8e68f"),
    "classic_pointer": ((TEXT, PROJ, "pointer", PIX, "head"), 295, "d5361e69701bf4c3"),
    "classic_pointer_prior": ((TEXT, PROJ, "pointer"), 83, "19d685309f739f4b"),
    "mllm": (("vision", PROJ, "mllm", PIX, "head"), 316, "12aff39e9ed40391"),
    "mllm_auto": (("vision", PROJ, "mllm", PIX, "head", *SAM), 494, "cbc6ddbe3db7a71a"),
    "mllm_pointer_prior": (("vision", PROJ, "mllm"), 110, "31d07a407ebfedf3"),
    "mllm_no_tower": ((PROJ, "mllm", PIX, "head"), 261, "73645d7042aeb0d6"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_keys_stay_as_recorded(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*KINDS[kind]))
    keys = list(model.state_dict())
    parts, count, digest = RECORDED[kind]
    assert tuple(name for name, _ in model.named_children()) == parts
    assert all(key.split(".", 1)[0] in parts for key in keys)
    assert len(keys) == count
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == digest


def test_the_query_source_checks_its_parts_and_the_model_its_mode() -> None:
    classic = build_parts(tiny_cfg(*KINDS["classic_pointer"])).kwargs
    text = classic["queries"]
    assert isinstance(text, TextQueries) and set(text.parts()) == {TEXT, PROJ, "pointer"}
    with pytest.raises(ConfigError, match="a projector exactly with its region pointer"):
        TextQueries(text.text_encoder, text.projector)
    mllm = build_parts(tiny_cfg(*KINDS["mllm"])).kwargs
    llm = mllm["queries"]
    assert isinstance(llm, LLMQueries) and set(llm.parts()) == {"vision", PROJ, "mllm"}
    with pytest.raises(ConfigError, match=r"vision tower exactly when projector\.tower is on"):
        LLMQueries(None, llm.projector, llm.mllm)
    with pytest.raises(ConfigError, match="mode: 'classic' with a mllm-mode query source"):
        RISModel(**{**classic, "queries": llm})
