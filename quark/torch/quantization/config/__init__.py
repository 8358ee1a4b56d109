"""Layer 1: the Quark-compatible config API (import from ``.config``, ``.custom_config``, ``.type``)."""
