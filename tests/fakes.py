"""Fake OpenAI (chat completions) and Anthropic (messages) servers on 127.0.0.1, speaking the real wire
protocols, so the official SDKs are exercised through their base-URL settings. Scriptable failures:
429 with Retry-After, 5xx, slow replies (timeouts), malformed and non-JSON bodies. Calls are counted."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

SENT_RE = re.compile(r"(?<=[.!?])\s+")
WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]+")
STOP = {"the", "and", "for", "with", "that", "this", "from", "are", "was", "has", "its", "into", "every", "each"}


def pairs_from_passage(text: str, n: int) -> list[dict]:
    """What a decent teacher returns: standalone questions, answers taken from the passage."""
    passage = text.split("Passage:\n", 1)[-1].split("\n\nWrite ", 1)[0]
    out = []
    for s in SENT_RE.split(passage.replace("\n", " ")):
        words = [w for w in WORD_RE.findall(s) if w.lower() not in STOP]
        if len(words) < 4:
            continue
        out.append({"question": f"What does the manual say about {' '.join(words[:3])}?", "answer": s.strip()})
        if len(out) >= n:
            break
    return out


def wanted_pairs(text: str) -> int:
    m = re.search(r"Write (\d+) question", text)
    return int(m.group(1)) if m else 3


class Behaviour:
    """Decides each reply. ``script`` maps a call number (1-based, per path) to an action."""

    def __init__(self):
        self.script: dict[int, str] = {}
        self.default = "ok"
        self.delay_s = 0.0
        self.retry_after = "1"
        self.reply: Optional[Callable[[dict], str]] = None  # custom assistant text
        self.count_tokens: Optional[Callable[[str], int]] = None  # report real prompt tokens (else a fixed 1000)
        self.no_usage = False  # replies without a `usage` field, as some servers send them

    def action(self, n: int) -> str:
        return self.script.get(n, self.default)


class FakeServer:
    def __init__(self):
        self.calls: Counter = Counter()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.behaviour = Behaviour()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                path = self.path.split("?")[0]
                with server.lock:
                    server.calls[path] += 1
                    n = server.calls[path]
                    server.requests.append({"path": path, "body": body, "headers": dict(self.headers)})
                b = server.behaviour
                act = b.action(n)
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    return self._reply(body, path, b, act)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _reply(self, body, path, b, act):
                if b.delay_s:
                    time.sleep(b.delay_s)
                if act == "404":
                    return self._send(404, {"error": {"message": "The model does not exist", "type": "invalid_request_error",
                                                      "code": "model_not_found"}})
                if act == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                                      {"Retry-After": b.retry_after})
                if act == "500":
                    return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                if act == "slow":
                    time.sleep(3)
                if act == "nonjson":
                    return self._raw(200, b"<html>gateway hiccup</html>", "text/html")
                if act == "truncated":  # a 200 whose JSON body was cut off
                    data = json.dumps(server.openai_reply(body, "ok")).encode()
                    return self._raw(200, data[: len(data) // 2], "application/json")
                if act == "trickle":  # headers at once, then one byte a second for a minute
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "60")
                    self.end_headers()
                    try:
                        for _ in range(60):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(1)
                    except OSError:
                        pass
                    return
                if path.endswith("/chat/completions"):
                    return self._send(200, server.openai_reply(body, act))
                if path.endswith("/messages"):
                    return self._send(200, server.anthropic_reply(body, act))
                return self._send(404, {"error": {"message": "not found"}})

            def _send(self, code, obj, headers=None):
                self._raw(code, json.dumps(obj).encode(), "application/json", headers)

            def _raw(self, code, data, ctype, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _text(self, body: dict, act: str) -> str:
        user = "\n".join(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]) for m in body["messages"] if m["role"] == "user")
        if self.behaviour.reply:
            return self.behaviour.reply(body)
        if act == "malformed":
            return "Sure! Here are some pairs: question one, answer one."
        last = body["messages"][-1]["content"]
        if isinstance(last, str) and last.startswith("Topic:") and "\nSentence: " in last:  # the sentence strategy
            words = [w for w in WORD_RE.findall(last.split("\nSentence: ", 1)[1]) if w.lower() not in STOP]
            return f"What does the manual say about {' '.join(words[:4])}?"
        return json.dumps({"pairs": pairs_from_passage(user, wanted_pairs(user))})

    def openai_reply(self, body: dict, act: str) -> dict:
        text = self._text(body, act)
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "x"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            **({} if self.behaviour.no_usage else {"usage": self.usage(body, text)}),
        }

    def usage(self, body: dict, text: str) -> dict:
        count = self.behaviour.count_tokens
        if count is None:
            return {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
        # as chat APIs count: the message texts plus a few tokens of framing per message
        prompt = sum(count(m["content"]) + 4 for m in body["messages"])
        return {"prompt_tokens": prompt, "completion_tokens": count(text), "total_tokens": prompt + count(text)}

    def anthropic_reply(self, body: dict, act: str) -> dict:
        text = self._text(body, act)
        content: list[dict]
        if body.get("tools") and act != "malformed":
            try:
                content = [{"type": "tool_use", "id": "toolu_fake", "name": body["tools"][0]["name"], "input": json.loads(text)}]
            except json.JSONDecodeError:
                content = [{"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": text}]
        return {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": body.get("model", "x"), "content": content,
            "stop_reason": "tool_use" if content[0]["type"] == "tool_use" else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 1000, "output_tokens": 200},
        }
