"""The Provider interface: what every provider shares (retries, deadlines, rate limits, batches, reply parsing).

A provider subclass says its name, default model, key variable and capabilities, implements ``_call`` (one
request) or ``complete_many`` (a batch), and registers itself (opensem.llm.registry). The built-in ones live
in openai_models.py, anthropic_models.py and local_models.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from opensem.config import LLMSpec
from opensem.errors import OpenSEMError


class LLMError(Exception):
    """A call failed after its retries (or could not be retried). Never contains an API key.

    ``unreachable``: the endpoint never answered usefully (connection errors, timeouts, 429/5xx until the
    retries ran out), as opposed to a request it rejected."""

    def __init__(self, msg: str, unreachable: bool = False):
        super().__init__(msg)
        self.unreachable = unreachable


@dataclass
class LLMReply:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    data: Any = None  # parsed JSON when a schema was requested and the reply parsed
    cached: bool = False
    meta: dict = field(default_factory=dict)


@dataclass
class Call:
    """One request of a batch for ``complete_many``: what to ask, then the reply or the error."""

    messages: list[dict]
    schema: Optional[dict] = None
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    variant: int = 0  # several samples of one prompt: part of the cache key, and the local sampling seed
    stop_after: tuple[str, ...] = ()  # the reply is used up to the first of these: a local model stops there
    tag: Any = None  # the caller's own data (e.g. the chunk it was made from)
    reply: Optional[LLMReply] = None
    error: Optional[str] = None


THINK_TAG_RE = re.compile(r"<(/?)think>", re.I)


def strip_reasoning(text: str) -> str:
    """The reply without its reasoning: ``<think>...</think>`` blocks, an unclosed one at the end (a reply cut
    short while thinking), and everything before a closing tag whose opening the server swallowed. One pass over
    the tags: linear in the reply's length, however many blocks it repeats."""
    out: list[str] = []
    pos, inside, closed_any = 0, False, False
    for m in THINK_TAG_RE.finditer(text):
        closing = bool(m.group(1))
        if not inside and not closing:
            out.append(text[pos:m.start()])
            inside = True
        elif inside and closing:
            inside, closed_any = False, True
        elif not inside and closing:  # a stray closing tag: the opening one was swallowed
            if not closed_any:
                out.clear()
            else:
                out.append(text[pos:m.start()])
        pos = m.end()
    if not inside:
        out.append(text[pos:])
    return "".join(out).strip()


def parse_json_lenient(text: str) -> Any:
    """JSON from a chatty reply: code fences, leading prose, trailing commas, reasoning blocks. Linear time."""
    text = strip_reasoning(text)
    start = text.find("```")
    if start != -1:
        end = text.find("```", start + 3)
        if end != -1:
            head = text[start + 3 : end]
            if head[:4].lower() == "json":
                head = head[4:]
            text = head
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if start != -1 and end > start:
            chunk = text[start : end + 1]
            for candidate in (chunk, _TRAILING_COMMA_RE.sub(r"\1", chunk)):
                try:
                    return json.loads(candidate)
                except (json.JSONDecodeError, RecursionError):
                    continue
    raise ValueError("no JSON object found in the reply")


_TRAILING_COMMA_RE = re.compile(r",[ \t\r\n]*([}\]])")


class RateLimiter:
    """Requests- and tokens-per-minute limits shared by all worker threads (a sliding 60 s window)."""

    def __init__(self, rpm: Optional[int], tpm: Optional[int], window_s: float = 60.0):
        self.rpm, self.tpm, self.window = rpm, tpm, window_s
        self.events: list[tuple[float, int]] = []
        self.lock = threading.Lock()

    def acquire(self, tokens: int, cancelled: Optional[threading.Event] = None) -> None:
        if not self.rpm and not self.tpm:
            return
        while True:
            with self.lock:
                now = time.monotonic()
                self.events = [(t, n) for t, n in self.events if now - t < self.window]
                ok_r = not self.rpm or len(self.events) < self.rpm
                ok_t = not self.tpm or sum(n for _, n in self.events) + tokens <= self.tpm or not self.events
                if ok_r and ok_t:
                    self.events.append((now, tokens))
                    return
                wait = self.window - (now - self.events[0][0]) + 0.01
            if cancelled is not None and cancelled.wait(min(max(wait, 0.01), 5)):
                raise LLMError("cancelled")
            elif cancelled is None:
                time.sleep(min(max(wait, 0.01), 5))


class Provider:
    """A chat model. Subclasses implement ``_call``; retries, rate limits and parsing live here."""

    name = "base"  # what `provider:` says in a config
    default_model = "default"  # when the config names no model
    key_env: Optional[str] = None  # the environment variable with its key (a config's api_key_env overrides it)
    key_required = False  # refuse to start without a key
    needs_base_url = False  # a server of the user's: `base_url` is required
    in_process = False  # a model in this process: no price, its own tokenizer counts prompts
    remote = True  # a call over the network: under a wall-clock deadline, in a thread Ctrl-C does not wait for

    def __init__(self, spec: LLMSpec, models_dir=None):
        self.spec = spec
        self.model = spec.resolved_model()
        self.limiter = RateLimiter(spec.requests_per_minute, spec.tokens_per_minute)
        self.cancelled = threading.Event()  # set on Ctrl-C: calls in flight give up within POLL_S

    @classmethod
    def status(cls) -> str:
        """One line for `opensem doctor`: the provider and what it still needs here."""
        if cls.key_required and cls.key_env and not os.environ.get(cls.key_env):
            return f"{cls.name} (needs {cls.key_env})"
        return cls.name + (" (any base_url)" if cls.needs_base_url else "")

    def api_key(self) -> Optional[str]:
        env = self.spec.resolved_key_env()
        key = os.environ.get(env) if env else None
        if not key and self.key_required:
            raise OpenSEMError(f"provider '{self.spec.provider}' needs an API key in the environment variable {env} "
                               f"(set it, or use provider: local / openai-compatible)")
        return key

    def max_reply_chars(self, max_tokens: int) -> int:
        """A reply longer than this is a failed call (never parsed, never cached): no token is 32 characters."""
        return max(256_000, 32 * max_tokens)

    base_url: Optional[str] = None  # the server, from the config or the SDK's environment variable

    # identity used by the cache and the manifest: what selects the server and changes the answer
    def identity(self) -> dict:
        return {"provider": self.spec.provider, "model": self.model, "base_url": public_url(self.base_url)}

    def complete(
        self,
        messages: list[dict],
        schema: Optional[dict] = None,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
    ) -> LLMReply:
        temperature = self.spec.temperature if temperature is None else temperature
        max_tokens = max_tokens or self.spec.max_tokens
        est = sum(len(m["content"]) for m in messages) // 4 + max_tokens
        attempt = 0
        while True:
            if self.cancelled.is_set():
                raise LLMError("cancelled")
            self.limiter.acquire(est, self.cancelled)
            try:
                if self.remote:
                    reply = self._within_deadline(lambda: self._call(messages, schema, temperature, max_tokens))
                else:
                    reply = self._call(messages, schema, temperature, max_tokens)
                break
            except RetryableError as e:
                attempt += 1
                if attempt > self.spec.max_retries:
                    raise LLMError(f"{self.spec.provider}/{self.model}: gave up after {attempt} tries: {e}", unreachable=True) from None
                if self.cancelled.wait(backoff_delay(attempt, e.retry_after)):
                    raise LLMError("cancelled") from None
        cap = self.max_reply_chars(max_tokens)
        if len(reply.text) > cap:
            raise LLMError(f"{self.spec.provider}/{self.model}: a reply of {len(reply.text):,} characters is over the cap of "
                           f"{cap:,} for max_tokens {max_tokens}: not used")
        return finish_reply(reply, schema)

    POLL_S = 0.2

    def _within_deadline(self, call: Callable[[], LLMReply]) -> LLMReply:
        """``call()`` with a wall-clock deadline of ``timeout_s`` for the whole exchange (connect, headers, every
        byte of the body), however slowly a server trickles. It runs in a daemon thread: a call abandoned at
        its deadline or on Ctrl-C never keeps the process alive."""
        box: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["reply"] = call()
            except BaseException as e:  # handed to the caller
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name="opensem-call", daemon=True).start()
        end = time.monotonic() + self.spec.timeout_s
        while not done.wait(min(self.POLL_S, max(0.0, end - time.monotonic()))):
            if self.cancelled.is_set():
                raise LLMError("cancelled")
            if time.monotonic() >= end:
                raise RetryableError(f"no complete reply within timeout_s {self.spec.timeout_s:g} s")
        if "error" in box:
            raise box["error"]
        return box["reply"]

    # a run of this many identical failures stops a batch: a wrong model name or URL fails every call alike
    max_same_errors = 5

    def complete_many(
        self,
        calls: list[Call],
        on_done: Optional[Callable[[Call], None]] = None,
        may_start: Optional[Callable[[Call], Optional[str]]] = None,
    ) -> Optional[str]:
        """Run every call: at most ``spec.concurrency`` at once, within the rate limits. Each finished call
        (its reply, or its error) goes to ``on_done`` in the calling thread as it arrives. ``may_start(call)``
        returns a reason to stop before the call is made (a budget), or None. Returns why the batch stopped
        early, or None when every call ran."""
        on_done = on_done or (lambda c: None)
        queue = list(calls)
        pending: set = set()
        stop: Optional[str] = None
        same = _SameErrors(self.max_same_errors)

        def one(c: Call) -> Call:
            try:
                c.reply = self.complete(c.messages, c.schema, c.temperature, c.max_tokens)
            except LLMError as e:
                c.error = str(e)
            except OpenSEMError:
                raise  # a rejected key: every call would fail alike
            except Exception as e:  # a reply the SDK could not take apart: a failed call, counted, never a crash
                c.error = f"{self.spec.provider}/{self.model}: unusable reply ({type(e).__name__})"
            return c

        pool = ThreadPoolExecutor(max_workers=self.spec.concurrency)
        try:
            while queue or pending:
                while queue and len(pending) < self.spec.concurrency and stop is None:
                    stop = may_start(queue[0]) if may_start else None
                    if stop is None:
                        pending.add(pool.submit(one, queue.pop(0)))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    c = fut.result()
                    on_done(c)
                    stop = stop or same.add(c.error)
        except BaseException:
            self.cancelled.set()  # the workers' calls give up within POLL_S; Ctrl-C never waits for a server
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return stop

    def _call(self, messages, schema, temperature, max_tokens) -> LLMReply:  # pragma: no cover
        raise NotImplementedError


class RetryableError(Exception):
    def __init__(self, msg: str, retry_after: Optional[float] = None):
        super().__init__(msg)
        self.retry_after = retry_after


class _SameErrors:
    """Counts identical failures in a row; says stop when there are ``limit`` of them."""

    def __init__(self, limit: int):
        self.limit, self.last, self.count = limit, None, 0

    def add(self, error: Optional[str]) -> Optional[str]:
        if error is None:
            self.last, self.count = None, 0
            return None
        self.count = self.count + 1 if error == self.last else 1
        self.last = error
        if self.count >= self.limit:
            return f"{self.count} identical failures in a row: {error}"
        return None


def finish_reply(reply: LLMReply, schema: Optional[dict]) -> LLMReply:
    """Every reply, from any provider or the cache: reasoning blocks removed, JSON parsed when asked for."""
    reply.text = strip_reasoning(reply.text)
    if schema is not None and reply.data is None:
        try:
            reply.data = parse_json_lenient(reply.text)
        except ValueError:
            reply.data = None  # the caller counts it as malformed
    return reply


def backoff_delay(attempt: int, retry_after: Optional[float], base: float = 0.5, cap: float = 60.0) -> float:
    """Honour Retry-After when the server sent one; else exponential backoff with full jitter."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), cap)
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def retry_after_of(exc: Exception) -> Optional[float]:
    resp = getattr(exc, "response", None)
    headers = getattr(resp, "headers", None) or {}
    for key in ("retry-after-ms", "retry-after"):
        val = headers.get(key)
        if val is None:
            continue
        try:
            seconds = float(val)
        except ValueError:
            continue
        return seconds / 1000 if key.endswith("ms") else seconds
    return None


def describe_error(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    return f"{name} (HTTP {status})" if status else name


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def http_client(sdk, seconds: float):
    """The SDK's own httpx client, its body reads cut at ``seconds`` after the request started: a call abandoned
    at its deadline (``Provider._within_deadline``) then also ends its connection soon after, instead of
    reading a trickling server for as long as it likes. With a proxy in the environment the SDK's default
    client is used as it is (a custom transport would bypass the proxy)."""
    import importlib

    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    # the HTTP library the SDK itself is built on (httpx, or the fork newer SDKs ship)
    httpx = importlib.import_module(sdk.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])

    class Body(httpx.SyncByteStream):
        def __init__(self, inner, end: float):
            self.inner, self.end = inner, end

        def __iter__(self):
            for chunk in self.inner:
                if time.monotonic() > self.end:
                    raise httpx.ReadTimeout(f"no complete reply within {seconds:g} s")
                yield chunk

        def close(self) -> None:
            self.inner.close()

    class Deadline(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request):
            end = time.monotonic() + seconds
            r = self.inner.handle_request(request)
            return httpx.Response(r.status_code, headers=r.headers, stream=Body(r.stream, end), extensions=r.extensions)

        def close(self) -> None:
            self.inner.close()

    return sdk.DefaultHttpxClient(transport=Deadline())


def public_url(url: Optional[str]) -> Optional[str]:
    """A server's URL as it may be written down: no user, password or query (a key is sometimes put there)."""
    if not url:
        return None
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return "(an unparsable URL)"
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((u.scheme, host + (f":{port}" if port else ""), u.path.rstrip("/"), "", ""))
