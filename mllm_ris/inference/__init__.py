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

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from mllm_ris.inference.chat import ChatSession
    from mllm_ris.inference.pipeline import (
        MAX_IMAGE_PIXELS,
        MAX_QUERY_CHARS,
        InputError,
        RISPipeline,
        default_model_path,
        load_image,
    )
    from mllm_ris.inference.results import Prediction, RISResult
    from mllm_ris.inference.scenes import bundled_scenes, make_sample_scenes

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

# every public name, by the module it is imported from on first access (PEP 562, lazy_loader)
__getattr__, __dir__, _ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "chat": ["ChatSession"],
        "pipeline": [
            "InputError",
            "MAX_IMAGE_PIXELS",
            "MAX_QUERY_CHARS",
            "RISPipeline",
            "default_model_path",
            "load_image",
        ],
        "results": ["Prediction", "RISResult"],
        "scenes": ["bundled_scenes", "make_sample_scenes"],
    },
)
