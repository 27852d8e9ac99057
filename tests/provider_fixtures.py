"""A provider of one's own, outside src/: registered by name through an entry point, or named in a config as
``provider_fixtures:Parrot``. It answers in this process, from the passage it is given."""

from __future__ import annotations

import json

from fakes import pairs_from_passage, wanted_pairs

from opensem.llm.base import LLMReply, Provider


class Parrot(Provider):
    """Writes pairs whose answers are the passage's own sentences."""

    name = "parrot"
    default_model = "parrot-1"
    remote = False  # nothing to wait for

    def _call(self, messages, schema, temperature, max_tokens) -> LLMReply:
        user = "\n".join(m["content"] for m in messages if m["role"] == "user")
        text = json.dumps({"pairs": pairs_from_passage(user, wanted_pairs(user))})
        return LLMReply(text, input_tokens=len(user) // 4, output_tokens=len(text) // 4)
