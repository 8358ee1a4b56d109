"""Advanced quantization algorithms (layer 7): SmoothQuant, AutoSmoothQuant, AWQ, GPTQ, rotations."""
