"""polyquant: quantization for non-LLM models."""

__version__ = "0.1.0"
