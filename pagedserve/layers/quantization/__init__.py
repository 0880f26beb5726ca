"""Quantized linear layers (``--quantization``): int8 weights, kernels chosen per CPU."""
