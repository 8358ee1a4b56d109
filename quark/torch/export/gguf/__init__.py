"""GGUF export (llama.cpp) through the ``gguf`` package."""
