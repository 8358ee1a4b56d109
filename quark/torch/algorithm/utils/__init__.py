"""Algorithm package: utils."""
