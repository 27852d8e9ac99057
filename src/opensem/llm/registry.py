"""Providers by name: the built-in ones, those of installed packages, and your own.

A provider is one class (a ``Provider`` subclass) that says its name, default model, key variable and what it
can do, and implements ``_call`` (or ``complete_many``). It registers itself:

    from opensem.llm.base import Provider
    from opensem.llm.registry import register

    @register
    class MyProvider(Provider):
        name = "my-server"
        ...

The built-ins register the same way (opensem.llm.openai_models, anthropic_models, local_models). A separate
package adds one with an entry point in the ``opensem.providers`` group; a config can also name a class
directly: ``provider: my_package.module:MyProvider``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

PROVIDERS: dict[str, type] = {}
ENTRY_POINTS = "opensem.providers"
BUILT_IN = ("opensem.llm.openai_models", "opensem.llm.anthropic_models", "opensem.llm.local_models")
_loaded = False


def register(cls: type) -> type:
    PROVIDERS[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILT_IN:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINTS):
        try:
            register(ep.load())
        except Exception as e:  # a broken plugin must not take the built-ins with it
            import warnings

            warnings.warn(f"provider plugin {ep.name!r} ({ep.value}) could not be loaded: {e}", stacklevel=2)


def names() -> list[str]:
    _load()
    return list(PROVIDERS)


def provider_class(name: str) -> type:
    """The provider class for a config's ``provider:`` value: a registered name or ``package.module:Class``."""
    from opensem.llm.base import Provider

    _load()
    if name in PROVIDERS:
        return PROVIDERS[name]
    if isinstance(name, str) and ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"cannot load provider {name!r} ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Provider)):
            raise ValueError(f"{name!r} is not a Provider class")
        return cls
    raise ValueError(f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}, or package.module:Class for your own")


def get_provider(spec, models_dir=None):
    """The provider a config's LLMSpec asks for, ready to call."""
    return provider_class(spec.provider)(spec, models_dir=models_dir)
