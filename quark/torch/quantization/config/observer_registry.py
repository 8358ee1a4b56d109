"""The allow-list of observer classes a ``QuantizationSpec`` may name, by class name.

The observers themselves are modules of layer 3 (``quark.torch.quantization.observer.observer``), above
this config layer, so the config layer does not import them: each built-in observer registers itself
here when its module is imported, and the package ``quark.torch.quantization`` imports that module
first, before any spec can be built. Names are resolved only through this allow-list, never by
importing a path read from a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

_OBSERVERS: dict[str, type] = {}


def register_observer(cls: type) -> type:
    """Add an observer class under its class name; it must declare the ``qschemes`` and ``kinds`` it serves.

    Registering the same class again is a no-op; another class under a taken name raises.
    """
    for attribute in ("qschemes", "kinds"):
        if not isinstance(getattr(cls, attribute, None), tuple):
            raise ValueError(f"observer class {cls.__qualname__} must declare {attribute} as a tuple to be registered")
    name = cls.__name__
    existing = _OBSERVERS.get(name)
    if existing is not None and existing is not cls:
        taken_by = f"{existing.__module__}.{existing.__qualname__}"
        raise ValueError(f"observer name {name!r} is already registered by {taken_by}; "
                         f"cannot register {cls.__module__}.{cls.__qualname__} under it")
    _OBSERVERS[name] = cls
    return cls


def registered_observers() -> Mapping[str, type]:
    """The registered observer classes by class name, in registration order (read-only)."""
    if not _OBSERVERS:
        raise RuntimeError("no observer classes are registered: import quark.torch.quantization.observer.observer "
                           "(importing any module of quark.torch.quantization does)")
    return MappingProxyType(_OBSERVERS)


__all__ = ["register_observer", "registered_observers"]
