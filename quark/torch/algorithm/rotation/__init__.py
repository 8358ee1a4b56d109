"""Algorithm package: rotation."""
