"""Inference: the pipeline API, the bundled default model, and the segment / chat / demo / app commands.

```python
from mllm_ris.inference import RISPipeline

pipe = RISPipeline.from_pretrained()            # the bundled default model (offline)
result = pipe("scene.png", "the red circle")    # RISResult: a sequence of Prediction
result.answer_text, [(p.score, p.box, p.rle) for p in result]
```

See docs/inference.md.
"""

from mllm_ris.inference.chat import ChatSession
from mllm_ris.inference.default_model import bundled_scenes, default_model_path, make_sample_scenes
from mllm_ris.inference.inputs import MAX_IMAGE_PIXELS, MAX_QUERY_CHARS, InputError, load_image
from mllm_ris.inference.pipeline import RISPipeline
from mllm_ris.inference.results import Prediction, RISResult

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
