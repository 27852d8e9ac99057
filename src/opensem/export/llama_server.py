"""The served expert on llama.cpp: llama-cpp-python's OpenAI-compatible server on one GGUF, answering as the model
was judged.

llama-cpp-python's server samples with its own defaults (a repeat penalty of 1.1 among them) where a request leaves
a setting out, and the OpenAI SDK leaves most out; the judge answered greedily with no penalty, the judged
``max_new_tokens`` and the system prompt of eval_config.yaml. So a request that leaves a setting out gets the
judged one, and a chat without a system message gets the judged system prompt. What a request sets itself is kept.

    python -m opensem.export.llama_server --model run.gguf --alias run --port 8000 --settings '{"temperature": 0, ...}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any, Optional

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_BODY_BYTES = 1_000_000  # a request body larger than this is refused (413); --max-body-bytes
MAX_MESSAGES = 256  # messages in one chat request
MAX_DEPTH = 32  # nesting of a request body's JSON
DEADLINE_S = 30.0  # for reading the prompt's passages (retrieval), off the event loop


class BadRequest(ValueError):
    """A request the server refuses with a 4xx JSON error instead of a traceback."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _depth(text: bytes, limit: int) -> None:
    """Refuse JSON nested deeper than ``limit`` before parsing it (a body of 100k '[' would exhaust the parser's
    recursion); brackets inside strings do not count."""
    depth, in_str, escaped = 0, False, False
    for ch in text.decode("utf-8", "replace"):
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise BadRequest(f"request body nested deeper than {limit} levels")
        elif ch in "]}":
            depth -= 1


def check_request(req: dict, chat: bool) -> None:
    """The shapes the server reads: messages a list of at most MAX_MESSAGES objects with a string role and string (or
    list-of-parts) content."""
    if not chat:
        return
    messages = req.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if not (content is None or isinstance(content, str) or (isinstance(content, list) and all(isinstance(x, dict) for x in content))):
            raise BadRequest(f"messages[{i}].content must be a string or a list of content parts")


def judged_settings(answers) -> dict[str, Any]:
    """eval_config.yaml's answers as llama.cpp request fields: greedy at temperature 0, no repeat penalty."""
    return {"temperature": answers.temperature, "max_tokens": answers.max_new_tokens, "repeat_penalty": 1.0}


def fill(body: bytes, settings: dict[str, Any], system: Optional[str], chat: bool, retriever=None) -> tuple[bytes, list]:
    """A request body with the judged settings where it has none, the judged system prompt where a chat has no system
    message, and, with a ``retriever``, the last user message put in the judge's "+ retrieval" prompt (unless the
    request says ``"retrieval": false``). Returns the body and the passages given. A body that is not a JSON object
    passes unchanged (the server answers it with its own error); one nested too deeply or with messages of the wrong
    shape raises BadRequest."""
    _depth(body or b"", MAX_DEPTH)
    try:
        req = json.loads(body or b"null")
    except ValueError:
        return body, []
    if not isinstance(req, dict):
        return body, []
    check_request(req, chat)
    for key, value in settings.items():
        if req.get(key) is None:
            req[key] = value
    messages = req.get("messages")
    if chat and system and isinstance(messages, list) and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        req["messages"] = messages = [{"role": "system", "content": system}, *messages]
    passages: list = []
    wanted = req.pop("retrieval", True) is not False
    if chat and retriever is not None and wanted and isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
        sys_msg = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "system"), None)
        if users:
            users[-1]["content"], passages = retriever(users[-1]["content"], sys_msg)
    return json.dumps(req).encode("utf-8"), passages


def with_sources(body: bytes, passages: list) -> bytes:
    """A chat completion response with the passages its answer was given, as ``sources`` (the OpenAI SDK keeps an
    unknown field: ``response.sources`` or ``response.model_extra["sources"]``)."""
    from opensem.retrieval import sources

    try:
        resp = json.loads(body)
    except ValueError:
        return body
    if not isinstance(resp, dict) or "choices" not in resp:
        return body
    return json.dumps(resp | {"sources": sources(passages)}).encode("utf-8")


class JudgedDefaults:
    """ASGI middleware: every chat or text completion request passes through ``fill`` before the server reads it; a
    non-streamed answer given passages carries them back."""

    def __init__(self, app, settings: dict[str, Any], system: Optional[str], retriever=None, max_body: int = MAX_BODY_BYTES,
                 deadline: float = DEADLINE_S):
        import threading

        self.app, self.settings, self.system = app, settings, system
        self.max_body, self.deadline = max_body, deadline
        lock = threading.Lock()  # one retrieval at a time (its tokenizer is not shared across threads); parsing is not held

        def serialized(question, system_prompt):
            with lock:
                return retriever(question, system_prompt)

        self.retriever = serialized if retriever is not None else None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in (CHAT, COMPLETIONS):
            return await self.app(scope, receive, send)
        body, more, size = b"", True, 0
        while more:  # read to the end (the client is still sending), keeping at most max_body bytes
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body:
                body += chunk
            more = message.get("more_body", False)
        if size > self.max_body:
            return await refuse(send, 413, f"request body of {size} bytes: at most {self.max_body}")
        try:  # parsing and retrieval in a worker thread: a slow request never blocks the others
            body, passages = await asyncio.wait_for(asyncio.to_thread(
                fill, body, self.settings, self.system, path == CHAT, self.retriever), self.deadline)
        except BadRequest as e:
            return await refuse(send, e.status, str(e))
        except asyncio.TimeoutError:
            return await refuse(send, 503, f"preparing the prompt took over {self.deadline:.0f} s")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # the client's disconnect, if it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        await self.app(scope, replay, self.sending(send, passages) if passages else send)

    @staticmethod
    def sending(send, passages: list):
        """``send`` for a response that gets its sources: the body held until complete, then sent with them. A stream
        (server-sent events) passes as it is."""
        held: dict = {}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                if any(k.lower() == b"content-type" and b"event-stream" in v for k, v in message.get("headers", [])):
                    held["stream"] = True
                    return await send(message)
                held["start"], held["body"] = message, b""
                return
            if held.get("stream") or "start" not in held or message["type"] != "http.response.body":
                return await send(message)
            held["body"] += message.get("body", b"")
            if message.get("more_body", False):
                return
            out = with_sources(held["body"], passages)
            headers = [(k, v) for k, v in held["start"].get("headers", []) if k.lower() != b"content-length"]
            await send(dict(held["start"], headers=[*headers, (b"content-length", str(len(out)).encode())]))
            await send({"type": "http.response.body", "body": out, "more_body": False})

        return wrapped


async def refuse(send, status: int, message: str) -> None:
    """An OpenAI-style JSON error, never a traceback."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--alias", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n_ctx", type=int, default=4096)
    p.add_argument("--settings", default="{}", help="JSON: the judged request fields")
    p.add_argument("--system", default=None, help="the judged system prompt")
    p.add_argument("--workspace", default=None, help="retrieve from this workspace's documents (its index, top_k)")
    p.add_argument("--checker", default=None, help="with --workspace: the evaluated model's folder (its tokenizer and context)")
    p.add_argument("--index", default=None, help="retrieve from an exported index folder (`opensem export --format retrieval`); "
                   "its retrieval.json gives the judged settings and system prompt")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies are refused (413)")
    args = p.parse_args(argv)
    retriever, settings, system = None, json.loads(args.settings), args.system
    if args.workspace:
        from opensem.retrieval import Retriever
        from opensem.workspace import Workspace

        retriever = Retriever.for_workspace(Workspace(args.workspace), args.checker)
    elif args.index:
        from pathlib import Path

        from opensem.retrieval import Retriever

        retriever = Retriever.from_export(Path(args.index))
        meta = json.loads((Path(args.index) / "retrieval.json").read_text(encoding="utf-8"))
        settings, system = settings or meta["settings"], system or meta["system_prompt"]
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    app = create_app(server_settings=ServerSettings(host="127.0.0.1", port=args.port),
                     model_settings=[ModelSettings(model=args.model, model_alias=args.alias, n_ctx=args.n_ctx, verbose=False,
                                                   seed=0, n_threads=os.cpu_count())])  # as the round-trip check ran it
    uvicorn.run(JudgedDefaults(app, settings, system, retriever, args.max_body_bytes), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
