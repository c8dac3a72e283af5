"""Suite-wide settings and the shared default-model fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_pipeline_kit import default_model_dir

from mllm_ris.data.synthetic import make_synthref
from mllm_ris.inference import RISPipeline
from mllm_ris.modeling.llm import ensure_special_tokens, load_tokenizer, random_causal_lm


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Every test model is tiny: one torch thread is fastest, and on a shared, loaded CPU two
    threads spin (often 10x slower). Subprocesses (accelerate launch) set their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as an HF folder: a base "from files", frozen under LoRA."""
    out = tmp_path_factory.mktemp("llm")
    tokenizer = ensure_special_tokens(load_tokenizer("bpe"))
    torch.manual_seed(1)
    llm = random_causal_lm(
        arch="llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64, tie_embeddings=False, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    llm.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def synthref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-image SynthRef (seed 5, 64 px) for the training tests (read only)."""
    out = tmp_path_factory.mktemp("synthref") / "synthref"
    make_synthref(out, images=10, seed=5, size=64, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled default model, or a rigged tiny one when it is not installed (read only)."""
    return default_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> RISPipeline:
    """A pipeline on :func:`model_dir`."""
    return RISPipeline.from_pretrained(model_dir)
