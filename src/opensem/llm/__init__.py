"""Chat models the tool talks to (teachers and judges), behind one small interface.

    provider = get_provider(spec)          # LLMSpec from a config file
    reply = provider.complete(messages, schema=SCHEMA)

Every provider returns an ``LLMReply`` with the text, the parsed JSON when a schema was asked for, and
token counts. ``CachedProvider`` wraps any of them with a content-addressed cache that is written as
each reply arrives (so nothing paid for is lost to a crash or Ctrl-C) and doubles as the call log.
"""

from opensem.llm.base import Call, LLMError, LLMReply, Provider, get_provider
from opensem.llm.cache import CachedProvider

__all__ = ["Call", "LLMError", "LLMReply", "Provider", "get_provider", "CachedProvider"]
