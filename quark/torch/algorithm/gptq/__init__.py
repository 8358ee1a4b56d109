"""Algorithm package: gptq."""
