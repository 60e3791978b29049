"""Shipping: generation, quantization, export (HF, GGUF, ONNX)."""
