"""quark-torch: an open implementation of the Quark for PyTorch quantization API."""

__version__ = "0.1.0"
