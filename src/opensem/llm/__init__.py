"""Chat models the tool talks to (teachers and judges), behind one small interface.

    provider = get_provider(spec)          # LLMSpec from a config file
    reply = provider.complete(messages, schema=SCHEMA)

Every provider returns an ``LLMReply`` with the text, the parsed JSON when a schema was asked for, and
token counts. ``CachedProvider`` wraps any of them with a content-addressed cache that is written as
each reply arrives (so nothing paid for is lost to a crash or Ctrl-C) and doubles as the call log.
Providers register themselves by name (opensem.llm.registry): openai, openai-compatible, anthropic, local, and any
an installed package adds (entry point group ``opensem.providers``) or a config names as ``package.module:Class``.
"""

from opensem.llm.base import Call, LLMError, LLMReply, Provider
from opensem.llm.cache import CachedProvider
from opensem.llm.registry import get_provider, provider_class, register

__all__ = ["Call", "LLMError", "LLMReply", "Provider", "get_provider", "provider_class", "register", "CachedProvider"]
