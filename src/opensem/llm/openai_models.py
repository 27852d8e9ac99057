"""The `openai` and `openai-compatible` providers, through the official OpenAI SDK."""

from __future__ import annotations

import os
from typing import Any

from opensem.config import LLMSpec
from opensem.errors import OpenSEMError
from opensem.llm.base import LLMError, LLMReply, Provider, RetryableError, describe_error, http_client, retry_after_of
from opensem.llm.registry import register


@register
class OpenAIProvider(Provider):
    """OpenAI's API (chat completions)."""

    name = "openai"
    default_model = "gpt-4o-mini"
    key_env = "OPENAI_API_KEY"
    key_required = True

    def __init__(self, spec: LLMSpec, models_dir=None):
        super().__init__(spec)
        import openai

        self._openai = openai
        key = self.api_key() or "not-needed"
        base = spec.base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.base_url = base
        self.client = openai.OpenAI(api_key=key, base_url=base, timeout=spec.timeout_s, max_retries=0,
                                    http_client=http_client(openai, spec.timeout_s + 1))
        self.schema_supported = True

    def _call(self, messages, schema, temperature, max_tokens) -> LLMReply:
        o = self._openai
        kwargs: dict[str, Any] = dict(model=self.model, messages=messages, temperature=temperature, max_tokens=max_tokens)
        if schema is not None and self.schema_supported:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema, "strict": True},
            }
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError) as e:
            raise RetryableError(describe_error(e), retry_after_of(e)) from None
        except (ValueError, o.APIResponseValidationError) as e:  # a 200 whose body is truncated or not JSON
            raise RetryableError(f"the reply's body is not valid JSON ({type(e).__name__})") from None
        except o.BadRequestError as e:
            if "response_format" in kwargs and self.needs_base_url:
                self.schema_supported = False  # old servers: ask in the prompt, parse leniently
                return self._call(messages, schema, temperature, max_tokens)
            raise LLMError(f"{self.spec.provider}/{self.model}: request rejected: {describe_error(e)}") from None
        except o.AuthenticationError:
            raise OpenSEMError(
                f"{self.spec.provider}: the API key in {self.spec.resolved_key_env()} was rejected (401)"
            ) from None
        except o.APIStatusError as e:
            if e.status_code >= 500 or e.status_code == 408:
                raise RetryableError(describe_error(e), retry_after_of(e)) from None
            raise LLMError(f"{self.spec.provider}/{self.model}: {describe_error(e)}") from None
        if not getattr(resp, "choices", None):
            raise RetryableError("reply had no choices")
        msg = resp.choices[0].message
        usage = getattr(resp, "usage", None)
        return LLMReply(
            text=msg.content or "",
            input_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            output_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )


@register
class OpenAICompatibleProvider(OpenAIProvider):
    """Any server that speaks OpenAI's chat completions: Ollama, vLLM, llama.cpp server, LM Studio, OpenRouter."""

    name = "openai-compatible"
    default_model = "default"
    key_env = None  # api_key_env names one when the server wants a key
    key_required = False
    needs_base_url = True
