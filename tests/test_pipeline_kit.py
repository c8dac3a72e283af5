"""Shared helpers of the inference tests (no tests here): tiny model folders and sample images.

The tests need a model whose answers are known without training: :func:`rigged_model` takes a tiny
random RISModel (mllm mode, the sizes of ``test_model_kit.TINY``) and turns its LLM into a fixed
bigram chain. With every attention / MLP output projection zeroed, the last hidden state at a
position is that token's own embedding, so the logits depend on the current token only; the LM
head rows are then set so the token after ``:`` (the end of ``ASSISTANT:``) starts ``answer`` and
each answer token is followed by the next, then ``</s>``. ``generate`` runs unchanged (KV cache,
visual tokens, [SEG] states); the head, pixel encoder and projector stay random, so a [SEG] gives
a random but real mask.

:func:`default_model_dir` is the folder the CLI / pipeline / app tests run: the bundled default model
when it is installed, else a rigged tiny model answering ``Sure, it is [SEG].``.
"""

from __future__ import annotations

import itertools
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_model_kit import tiny_cfg

from mllm_ris.inference.pipeline import default_model_installed, default_model_path
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.processing.processor import answer_text

TEST_SIZE = 64  # canvas side of the tiny test models (recorded as data.image_size)
SEG_ANSWER = answer_text(1)
REJ_ANSWER = answer_text(0)


def rigged_model(answer: str = SEG_ANSWER, *, seed: int = 0) -> RISModel:
    """A tiny mllm RISModel that answers ``answer`` to every prompt (see the module docstring)."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg("mllm", "direct", "model.mllm.lora.enabled=false"))
    assert model.mllm is not None
    tok, llm = model.mllm.tokenizer, model.mllm.llm
    prompt_end = tok(" ASSISTANT:", add_special_tokens=False)["input_ids"][-1]
    chain = [prompt_end, *tok(" " + answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "a bigram chain cannot repeat a token"
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        normed = llm.model.norm(llm.model.embed_tokens.weight)  # (V, D): the final state of each token
        head = llm.lm_head.weight
        head.zero_()
        for cur, nxt in itertools.pairwise(chain):
            head[nxt] += 4.0 * normed[cur] / normed[cur].norm()
    return model.eval()


def save_model_dir(path: Path, answer: str = SEG_ANSWER, *, image_size: int = TEST_SIZE) -> Path:
    """Write :func:`rigged_model` with ``save_pretrained`` and record ``data.image_size``."""
    rigged_model(answer).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["data"] = {"image_size": image_size}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def default_model_dir(tmp: Path) -> Path:
    """The bundled default model if installed, else a rigged tiny one written into ``tmp``."""
    if default_model_installed():
        return default_model_path()
    return save_model_dir(tmp / "tiny-default")


def using_bundled() -> bool:
    """Whether the tests run on the bundled (trained) model, whose answers are not fixed."""
    return default_model_installed()


def scene_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """``(h, w, 3)`` uint8: a red disc and a blue square on a noisy gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    image = rng.uniform(60, 120, 3)[None, None] + 40 * (xx / w)[..., None] + rng.normal(0, 4, (h, w, 3))
    image = image.clip(0, 255).astype(np.uint8)
    image[(yy - h // 3) ** 2 + (xx - w // 3) ** 2 < (h // 5) ** 2] = (220, 30, 30)
    image[(abs(yy - 2 * h // 3) < h // 6) & (abs(xx - 2 * w // 3) < h // 6)] = (30, 40, 220)
    return image


def write_png(path: Path, image: np.ndarray) -> Path:
    """Save ``image`` as PNG and return the path."""
    Image.fromarray(image).save(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR (8-bit RGB) + IEND: a valid header with no pixel data (a cheap "bomb")."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
