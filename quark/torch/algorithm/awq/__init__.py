"""Algorithm package: awq."""
