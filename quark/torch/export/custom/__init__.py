"""Other Hugging Face layouts: native fp8, AutoAWQ GEMM, compressed-tensors."""
