"""promptfoo runs the regression tests (FR-C1).

For each judge run we write a real promptfoo config into the run's folder: the golden items are the tests
(only their ids travel as variables; question and golden answer ride in each test's metadata and
description, which promptfoo neither templates nor loads as files), the model under test is a Python
provider that returns its pre-generated answers, and the grader is a Python assertion that asks the judge,
served from this process over 127.0.0.1, for a 1-5 score. promptfoo's JSON output is what every table is
built from, and `npx promptfoo view` shows the same eval in a browser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import yaml

from opensem.errors import OpenSEMError

PROMPTFOO_VERSION = "0.121.20"
OFFLINE_ENV = {
    "PROMPTFOO_DISABLE_TELEMETRY": "1",
    "PROMPTFOO_DISABLE_UPDATE": "1",
    "PROMPTFOO_DISABLE_SHARING": "1",
    "PROMPTFOO_DISABLE_REMOTE_GENERATION": "true",
    "PROMPTFOO_DISABLE_WAL_MODE": "1",
}


def find_promptfoo(configured: Optional[str], workspace: Path) -> list[str]:
    """The pinned promptfoo: configured command, the workspace's or the repository's node_modules, PATH."""
    if configured:
        cmd = configured.split()
        if not (shutil.which(cmd[0]) or Path(cmd[0]).exists()):
            raise OpenSEMError(
                f"configs/eval_config.yaml: key 'promptfoo': {cmd[0]!r} not found: remove the key to use the pinned "
                f"promptfoo from `npm ci`, or point it at an installed promptfoo"
            )
        return cmd
    repo = Path(__file__).resolve().parents[3]
    for root in (workspace, repo, Path.cwd()):
        exe = root / "node_modules" / ".bin" / "promptfoo"
        if exe.exists():
            return [str(exe)]
    if shutil.which("promptfoo"):
        return ["promptfoo"]
    if not shutil.which("node"):
        raise OpenSEMError("promptfoo needs Node.js >= 20.20: install Node, then run `npm ci` in the repository (or `make setup`)")
    raise OpenSEMError(f"promptfoo is not installed: run `npm ci` in the repository (pins promptfoo@{PROMPTFOO_VERSION}), or `make setup`")


class JudgeServer:
    """Serves verdicts to promptfoo's grader: POST {"id", "output"} -> {"score", "reason"} or {"error"}."""

    def __init__(self, score: Callable[[str, str], dict]):
        score_fn = score

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    result = score_fn(body["id"], body.get("output") or "")
                except Exception as e:  # the grader turns this into a promptfoo error, never a zero
                    result = {"error": f"{type(e).__name__}: {e}"}
                data = json.dumps(result).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/grade"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_config(run_dir: Path, label: str, items: list, answers_file: Path, pass_threshold: int, description: str) -> Path:
    files = resources.files("opensem") / "assets" / "promptfoo"
    for name in ("provider.py", "grader.py"):
        (run_dir / name).write_text((files / name).read_text(encoding="utf-8"), encoding="utf-8")
    config = {
        "description": description,
        "prompts": ["{{id}}"],
        "providers": [{"id": "file://provider.py", "label": label, "config": {"answers_file": str(answers_file)}}],
        "defaultTest": {"assert": [{"type": "python", "value": "file://grader.py"}]},
        "tests": [
            {
                "description": it.question,
                "vars": {"id": it.id},
                "metadata": {"question": it.question, "golden": it.answer, "pass_threshold": pass_threshold},
            }
            for it in items
        ],
        "evaluateOptions": {"maxConcurrency": 4},
    }
    path = run_dir / "promptfooconfig.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def run_eval(cmd: list[str], config: Path, output: Path, judge_url: str, answers_file: Path, python: str, log: Path) -> dict:
    env = os.environ | OFFLINE_ENV | {
        "OPENSEM_JUDGE_URL": judge_url,
        "OPENSEM_ANSWERS": str(answers_file),
        "PROMPTFOO_PYTHON": python,
    }  # promptfoo keeps the eval in its usual store (PROMPTFOO_CONFIG_DIR, default ~/.promptfoo): `promptfoo view` shows it
    args = cmd + ["eval", "-c", config.name, "-o", output.name, "--no-cache", "--no-progress-bar", "--no-share"]
    try:
        with log.open("w") as fh:
            proc = subprocess.run(args, cwd=config.parent, env=env, stdout=fh, stderr=subprocess.STDOUT)
    except OSError as e:
        raise OpenSEMError(f"promptfoo could not start ({e.strerror}: {args[0]}): run `npm ci` in the repository") from None
    # promptfoo exits 100 when some tests fail their threshold: that is a result, not an error
    if proc.returncode not in (0, 100) or not output.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise OpenSEMError(f"promptfoo failed (exit {proc.returncode}): {' | '.join(tail)[:300]} (full log: {log})")
    return json.loads(output.read_text(encoding="utf-8"))


def parse_results(data: dict) -> dict[str, dict]:
    """Per item id: output, score (1-5 or None), pass, reason, error: straight from promptfoo's JSON."""
    out: dict[str, dict] = {}
    for r in data["results"]["results"]:
        item_id = r["vars"]["id"]
        grading = r.get("gradingResult") or {}
        comps = grading.get("componentResults") or []
        reason = comps[0].get("reason", "") if comps else grading.get("reason", "")
        # failureReason: 0 none, 1 an assertion failed (a result), 2 an error (the judge or provider failed)
        error = (r.get("error") or "error") if r.get("failureReason") == 2 else None
        if error is None and "JUDGE_ERROR" in (reason or "") + (r.get("error") or ""):
            error = r.get("error") or reason
        score = (grading.get("namedScores") or {}).get("judge")
        if score is None and comps:
            score = comps[0].get("score")
        if error:
            score = None
        out[item_id] = {
            "output": (r.get("response") or {}).get("output", ""),
            "score": score,
            "pass": bool(grading.get("pass")) if not error else None,
            "reason": reason if not error else "",
            "error": _short_error(error) if error else None,
        }
    return out


def _short_error(err: str) -> str:
    marker = "JUDGE_ERROR: "
    if marker in err:
        return err[err.index(marker) + len(marker):].splitlines()[0][:300]
    return err.splitlines()[0][:300]
