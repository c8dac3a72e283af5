"""Models and their parts. Import the module you need (each pulls in only its own dependencies):

- ``losses``: mask losses and RISModel's loss terms;
- ``vision``: the HF vision tower; ``projector``: superpixel and patch projectors → ``VisualTokens``,
  and the region pointer (region logits, the painted prior);
- ``llm``, ``mllm``, ``lora``, ``llava``: the base LLM and its tokenizer, the grounding LLM, LoRA /
  QLoRA (training, adapters, export), LLaVA reuse;
- ``model`` (+ ``model_build``, ``model_config``, ``model_io``): ``RISModel``, every part composed
  from one config, both modes (classic: text encoder + pixel encoder + fusion head, no LLM, with or
  without the region pointer; mllm: the grounding LLM), output modes direct / sam / auto / prior, one
  model-folder format; ``predictor``: evaluation and inference.

Superpixels and region descriptors are not learned: :mod:`mllm_ris.processing.regions`.
"""
