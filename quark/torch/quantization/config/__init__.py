"""Layer 1: the Quark-compatible configuration API (import from ``.config``, ``.custom_config``, ``.type``)."""
