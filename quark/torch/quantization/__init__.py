"""Quantization: configs, formats, observers, quantizers, modules, calibration and ``ModelQuantizer``.

Importing the package registers the built-in observers (layer 3) in the config layer's allow-list
(``config/observer_registry.py``), so that every ``QuantizationSpec``, including the presets built
when ``config/custom_config.py`` is imported, can name them without the config layer importing upward.
"""

import quark.torch.quantization.observer.observer  # noqa: F401  (registers the built-in observers)
