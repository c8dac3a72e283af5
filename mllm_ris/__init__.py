"""mllm-ris: referring image segmentation with a grounding multimodal LLM and the S²RM head."""

__version__ = "0.1.0"

__all__ = ["__version__"]
