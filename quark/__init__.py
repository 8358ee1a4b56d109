"""quark-torch: an open implementation of the Quark for PyTorch quantization API."""

__version__ = "0.13.0"  # the Quark API and checkpoint-format level implemented (amd-quark 0.13)
