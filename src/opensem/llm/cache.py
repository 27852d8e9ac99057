"""A content-addressed cache of model replies, written as each reply arrives.

Key: sha256 of (provider identity, messages, schema, temperature, max_tokens). A rerun, or a run resumed
after Ctrl-C, a crash or a budget stop, makes zero repeated calls for work already done. Each entry keeps
the request and the reply, so the cache is also the log of every prompt and response (never a key).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from opensem.lineage import atomic_write_text
from opensem.llm.base import Call, LLMReply, Provider, finish_reply


class CachedProvider:
    def __init__(self, provider: Provider, cache_dir: Path):
        self.provider = provider
        self.cache_dir = Path(cache_dir)

    def key(self, messages, schema, temperature, max_tokens, variant: int = 0) -> str:
        payload = {
            "variant": variant,
            "id": self.provider.identity(),
            "messages": messages,
            "schema": schema,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[LLMReply]:
        p = self._path(key)
        if not p.exists():
            return None
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a torn file from an old crash: redo the call
        r = entry["reply"]
        return LLMReply(r["text"], r["input_tokens"], r["output_tokens"], r.get("data"), cached=True)

    def _resolve(self, c: Call) -> str:
        spec = self.provider.spec
        c.temperature = spec.temperature if c.temperature is None else c.temperature
        c.max_tokens = c.max_tokens or spec.max_tokens
        return self.key(c.messages, c.schema, c.temperature, c.max_tokens, c.variant)

    def put(self, key: str, messages, reply: LLMReply) -> None:
        entry = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "provider": self.provider.identity(),
            "messages": messages,
            "reply": {
                "text": reply.text,
                "data": reply.data,
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens,
                "usage_estimated": bool(reply.meta.get("usage_estimated")),
            },
        }
        atomic_write_text(self._path(key), json.dumps(entry, ensure_ascii=False))

    def complete(self, messages, schema=None, temperature=None, max_tokens=None, variant: int = 0) -> LLMReply:
        spec = self.provider.spec
        temperature = spec.temperature if temperature is None else temperature
        max_tokens = max_tokens or spec.max_tokens
        k = self.key(messages, schema, temperature, max_tokens, variant)
        hit = self.get(k)
        if hit is not None:
            return hit
        reply = self.provider.complete(messages, schema, temperature, max_tokens)
        self.put(k, messages, reply)
        return reply

    def complete_many(self, calls: list[Call], on_done=None, may_start=None) -> Optional[str]:
        """``Provider.complete_many`` through the cache: cached replies first, the rest from the provider,
        each written to the cache as it arrives. Returns why the provider stopped early, or None."""
        on_done = on_done or (lambda c: None)
        keys: dict[int, str] = {}
        misses: list[Call] = []
        for c in calls:
            keys[id(c)] = self._resolve(c)
            hit = self.get(keys[id(c)])
            if hit is None:
                misses.append(c)
                continue
            c.reply = finish_reply(hit, c.schema)
            on_done(c)
        if not misses:
            return None

        def done(c: Call) -> None:
            try:
                on_done(c)  # first: a budget fills in the usage of a reply that came without one
            finally:
                if c.reply is not None:
                    self.put(keys[id(c)], c.messages, c.reply)

        return self.provider.complete_many(misses, done, may_start)
