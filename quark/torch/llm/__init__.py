"""LLM tools (layer 10): model loading, calibration data, perplexity, recipe schemes, and the
``quark-quantize`` command line (:mod:`quark.torch.llm.cli`).

Submodules are imported on use, so ``import quark.torch.llm`` stays cheap.
"""
