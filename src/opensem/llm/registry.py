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

from opensem.plugins import Registry


def _is_provider(obj) -> bool:
    from opensem.llm.base import Provider

    return isinstance(obj, type) and issubclass(obj, Provider)


PROVIDERS = Registry("provider", "opensem.providers",
                     ("opensem.llm.openai_models", "opensem.llm.anthropic_models", "opensem.llm.local_models"), _is_provider)
register = PROVIDERS.register


def names() -> list[str]:
    return PROVIDERS.names()


def provider_class(name: str) -> type:
    """The provider class for a config's ``provider:`` value: a registered name or ``package.module:Class``."""
    return PROVIDERS.get(name)


def get_provider(spec, models_dir=None):
    """The provider a config's LLMSpec asks for, ready to call."""
    return provider_class(spec.provider)(spec, models_dir=models_dir)
