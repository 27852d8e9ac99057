"""The `local` provider: a model in this process (the embedded SmolLM2 by default), batched."""

from __future__ import annotations

from typing import Optional

from opensem.config import EMBEDDED_MODEL, LLMSpec
from opensem.llm.base import Call, LLMReply, Provider, finish_reply
from opensem.llm.registry import register


@register
class LocalProvider(Provider):
    """An in-process model through opensem.inference (the embedded model by default)."""

    name = "local"
    default_model = EMBEDDED_MODEL
    in_process = True
    remote = False

    @classmethod
    def status(cls) -> str:
        import importlib.util

        from opensem.models import EMBEDDED_PACKAGE

        embedded = importlib.util.find_spec(EMBEDDED_PACKAGE) is not None
        return f"local (embedded {EMBEDDED_MODEL})" if embedded else "local (embedded model missing)"

    def __init__(self, spec: LLMSpec, models_dir=None):
        super().__init__(spec)
        from pathlib import Path

        from opensem.models import resolve_base_model

        self.resolved = resolve_base_model(self.model, Path(models_dir or "models/base"))

    def identity(self) -> dict:
        return {"provider": "local", "model": self.model, "fingerprint": self.resolved.fingerprint}

    @property
    def chat_model(self):
        from opensem.inference import load_chat_model

        return load_chat_model(self.resolved.path)

    def complete_batch(self, conversations: list[list[dict]], temperature: float, max_tokens: int, seed: int = 0,
                       stop_after: tuple[str, ...] = ()):
        outs = self.chat_model.generate(conversations, max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                                        stop_after=stop_after, batch_size=self.decode_batch_size)
        return [LLMReply(o.text, o.prompt_tokens, o.completion_tokens) for o in outs]

    def _call(self, messages, schema, temperature, max_tokens) -> LLMReply:
        return self.complete_batch([messages], temperature, max_tokens)[0]

    batch_size = 64  # calls per batch (a batch's seed is its offset in its group: changing this changes samples)
    decode_batch_size = 64  # rows decoded together: a whole batch, so its other variants reuse its prompts' pass

    def complete_many(self, calls, on_done=None, may_start=None) -> Optional[str]:
        """One model in this process: calls with the same decoding settings are generated in batches. The groups
        take turns batch by batch, so the same prompts asked in several variants (the forge's wordings of one
        sentence) follow each other and share their prompts' forward pass (ChatModel._prefill)."""
        on_done = on_done or (lambda c: None)
        groups: dict[tuple, list[Call]] = {}
        for c in calls:
            t = self.spec.temperature if c.temperature is None else c.temperature
            groups.setdefault((t, c.max_tokens or self.spec.max_tokens, c.variant, tuple(c.stop_after)), []).append(c)
        longest = max((len(g) for g in groups.values()), default=0)
        for i in range(0, longest, self.batch_size):
            for (temperature, max_tokens, variant, stop_after), group in groups.items():
                part = group[i : i + self.batch_size]
                if not part:
                    continue
                for c in part:
                    stop = may_start(c) if may_start else None
                    if stop:
                        return stop
                fits = []
                for c in part:  # a prompt past the context window is a failed call, never a runaway batch
                    n = self.chat_model.prompt_tokens(c.messages)
                    context = self.chat_model.context_len
                    if context and n + max_tokens > context:
                        c.error = f"local/{self.model}: a prompt of {n} tokens plus {max_tokens} new tokens exceeds the context of {context}"
                        on_done(c)
                    else:
                        fits.append(c)
                part = fits
                if not part:
                    continue
                replies = self.complete_batch([c.messages for c in part], temperature, max_tokens, seed=variant * 1000 + i,
                                              stop_after=stop_after)
                for c, reply in zip(part, replies):
                    c.reply = finish_reply(reply, c.schema)
                    on_done(c)
        return None
