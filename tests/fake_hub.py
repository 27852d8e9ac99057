"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1: the endpoints huggingface_hub's create_repo and
create_commit call (repos/create, validate-yaml, preupload, commit), every file uploaded as a regular one. It records what it was
sent (headers included) and keeps the committed files."""

from __future__ import annotations

import base64
import json
import threading

import yaml
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.created: list[dict] = []
        self.commits: list[dict[str, bytes]] = []
        self.validated: list[dict] = []  # the model cards' front matter, parsed
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    hub.created.append(json.loads(body))
                    name = json.loads(body)
                    return self.reply({"url": f"{hub.url}/{name.get('organization')}/{name.get('name')}"})
                if path == "/api/validate-yaml":  # the card's front matter must parse, as on the Hub
                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
                    except yaml.YAMLError as e:
                        return self.reply({"error": str(e)}, 400)
                    hub.validated.append(meta)
                    return self.reply({"errors": [], "warnings": []} if isinstance(meta, dict) else {"error": "no metadata"},
                                      200 if isinstance(meta, dict) else 400)
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                                 for f in files]})
                if "/commit/" in path:
                    files = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    hub.commits.append(files)
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    return self.reply({"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
                self.reply({"error": f"not faked: {path}"}, 404)

            def reply(self, data: dict, status: int = 200):
                out = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
