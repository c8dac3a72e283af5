"""Inference: the pipeline API, the bundled default model, and the segment / chat / demo / app commands.

```python
from mllm_ris.inference import RISPipeline

pipe = RISPipeline.from_pretrained()            # the bundled default model (offline)
result = pipe("scene.png", "the red circle")    # RISResult: a sequence of Prediction
result.answer_text, [(p.score, p.box, p.rle) for p in result]
```

Nothing is imported here: the public names below come from their modules on first access, so a
command imports only the modules it runs (``mllm-ris segment`` does not import the chat session).

See docs/inference.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mllm_ris.inference.chat import ChatSession
    from mllm_ris.inference.default_model import bundled_scenes, default_model_path, make_sample_scenes
    from mllm_ris.inference.inputs import MAX_IMAGE_PIXELS, MAX_QUERY_CHARS, InputError, load_image
    from mllm_ris.inference.pipeline import RISPipeline
    from mllm_ris.inference.results import Prediction, RISResult

_MODULE_OF = {
    "ChatSession": "chat",
    "bundled_scenes": "default_model",
    "default_model_path": "default_model",
    "make_sample_scenes": "default_model",
    "MAX_IMAGE_PIXELS": "inputs",
    "MAX_QUERY_CHARS": "inputs",
    "InputError": "inputs",
    "load_image": "inputs",
    "RISPipeline": "pipeline",
    "Prediction": "results",
    "RISResult": "results",
}

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_QUERY_CHARS",
    "ChatSession",
    "InputError",
    "Prediction",
    "RISPipeline",
    "RISResult",
    "bundled_scenes",
    "default_model_path",
    "load_image",
    "make_sample_scenes",
]


def __getattr__(name: str) -> Any:
    """The public name ``name``, imported from its module on first use (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The module's names and the lazily imported public ones."""
    return sorted({*globals(), *__all__})
