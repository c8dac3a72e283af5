"""Models and their parts. Import the module you need (each pulls in only its own dependencies):

- ``classic``: text encoder + pixel encoder + fusion head (no LLM); ``losses``: mask losses;
- ``superpixels`` / ``superpixel_cache``: label maps for the superpixel projector;
- ``vision``: the HF vision tower; ``projector``: superpixel and patch projectors → ``VisualTokens``;
- ``tokens``, ``mllm``, ``lora``, ``llava``: the grounding LLM, its tokens, LoRA / QLoRA, LLaVA reuse;
- ``model`` (+ ``model_build``, ``model_losses``, ``model_io``): ``RISModel``, every part composed from
  one config, both modes, output modes direct / sam / auto; ``predictor``: evaluation and inference.
"""
