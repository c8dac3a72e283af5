"""Models and their parts. Import the module you need (each pulls in only its own dependencies):

- ``losses``: mask losses and RISModel's loss terms;
- ``superpixels`` / ``superpixel_cache``: label maps for the superpixel projector;
- ``vision``: the HF vision tower; ``projector``: superpixel and patch projectors → ``VisualTokens``;
- ``tokens``, ``mllm``, ``lora``, ``llava``: the grounding LLM, its tokens, LoRA / QLoRA, LLaVA reuse;
- ``model`` (+ ``model_build``, ``model_config``, ``model_io``): ``RISModel``, every part composed
  from one config, both modes (classic: text encoder + pixel encoder + fusion head, no LLM, with or
  without the region pointer; mllm: the grounding LLM), output modes direct / sam / auto / prior, one
  model-folder format; ``pointer``: the region pointer; ``predictor``: evaluation and inference.
"""
