"""Quantization-config conversions used when exporting and by transformers' ``QuarkConfig``."""
