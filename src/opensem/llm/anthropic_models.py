"""The `anthropic` provider, through the official Anthropic SDK."""

from __future__ import annotations

import json
import os
from typing import Any

from opensem.config import LLMSpec
from opensem.errors import OpenSEMError
from opensem.llm.base import LLMError, LLMReply, Provider, RetryableError, describe_error, http_client, retry_after_of
from opensem.llm.registry import register


@register
class AnthropicProvider(Provider):
    """Anthropic's Messages API; a JSON schema becomes a forced tool call."""

    name = "anthropic"
    default_model = "claude-3-5-haiku-latest"
    key_env = "ANTHROPIC_API_KEY"
    key_required = True

    def __init__(self, spec: LLMSpec, models_dir=None):
        super().__init__(spec)
        import anthropic

        self._anthropic = anthropic
        key = self.api_key()
        base = spec.base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        self.base_url = base
        self.client = anthropic.Anthropic(api_key=key, base_url=base, timeout=spec.timeout_s, max_retries=0,
                                          http_client=http_client(anthropic, spec.timeout_s + 1))
        # The 2.x SDK has no sampling parameters; older models still accept `temperature` on the wire,
        # newer ones refuse it with a 400, after which it is no longer sent.
        self.send_temperature = True

    def _call(self, messages, schema, temperature, max_tokens) -> LLMReply:
        a = self._anthropic
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [m for m in messages if m["role"] != "system"]
        kwargs: dict[str, Any] = dict(model=self.model, messages=chat, max_tokens=max_tokens)
        if self.send_temperature:
            kwargs["extra_body"] = {"temperature": temperature}
        if system:
            kwargs["system"] = system
        if schema is not None:
            kwargs["tools"] = [{"name": "output", "description": "Return the result", "input_schema": schema}]
            kwargs["tool_choice"] = {"type": "tool", "name": "output"}
        try:
            resp = self.client.messages.create(**kwargs)
        except (a.RateLimitError, a.InternalServerError, a.APITimeoutError, a.APIConnectionError) as e:
            raise RetryableError(describe_error(e), retry_after_of(e)) from None
        except (ValueError, a.APIResponseValidationError) as e:  # a 200 whose body is truncated or not JSON
            raise RetryableError(f"the reply's body is not valid JSON ({type(e).__name__})") from None
        except a.BadRequestError as e:
            if self.send_temperature and "temperature" in str(e).lower():
                self.send_temperature = False
                return self._call(messages, schema, temperature, max_tokens)
            raise LLMError(f"anthropic/{self.model}: request rejected: {describe_error(e)}") from None
        except a.AuthenticationError:
            raise OpenSEMError(
                f"anthropic: the API key in {self.spec.resolved_key_env()} was rejected (401)"
            ) from None
        except a.APIStatusError as e:
            if e.status_code >= 500 or e.status_code in (408, 529):
                raise RetryableError(describe_error(e), retry_after_of(e)) from None
            raise LLMError(f"anthropic/{self.model}: {describe_error(e)}") from None
        text, data = "", None
        for block in resp.content or []:
            if getattr(block, "type", "") == "tool_use":
                data = block.input
                text = json.dumps(block.input)
            elif getattr(block, "type", "") == "text":
                text += block.text
        usage = getattr(resp, "usage", None)
        return LLMReply(
            text=text,
            data=data,
            input_tokens=getattr(usage, "input_tokens", 0) or 0,
            output_tokens=getattr(usage, "output_tokens", 0) or 0,
        )
