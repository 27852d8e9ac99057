"""promptfoo runs the regression tests (FR-C1).

For each judge run we write a real promptfoo config into the run's folder: the golden items are the tests,
the model under test is a Python provider that returns its pre-generated answers, and the grader is a
Python assertion that asks the judge, served from this process over 127.0.0.1, for a 1-5 score.
promptfoo's JSON output is what every table is built from, and `npx promptfoo view` shows the same eval.

promptfoo renders variables, descriptions and config values as templates and loads `file://` values by
running them, so nothing the user wrote reaches it: each test is an opaque generated key (`t0001`), and
questions, golden answers and model answers are looked up on our side by that key. The promptfoo process
gets a minimal environment (no provider keys), and the judge server answers only requests that carry
the run's secret token.
"""

from __future__ import annotations

import json
import hmac
import os
import secrets
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


# what the promptfoo process may see of our environment: no API keys, nothing it does not need
ENV_ALLOW = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
             "SYSTEMROOT", "COMSPEC", "PATHEXT", "APPDATA", "LOCALAPPDATA", "USERPROFILE", "NODE_OPTIONS",
             "XDG_CONFIG_HOME", "XDG_CACHE_HOME"}  # no proxy variables: promptfoo needs no network at all
ENV_ALLOW_PREFIXES = ("LC_",)
ENV_PROMPTFOO_SETTINGS = {"PROMPTFOO_CONFIG_DIR", "PROMPTFOO_LOG_DIR", "PROMPTFOO_CACHE_PATH"}


def offline_guard() -> Path:
    return Path(str(resources.files("opensem") / "assets" / "promptfoo" / "offline_guard.cjs"))


def minimal_env(extra: dict[str, str], net_log: Path) -> dict[str, str]:
    """No API keys, promptfoo's offline switches, and the offline guard preloaded into every Node process:
    promptfoo still posts a "telemetry disabled" event to its host; the guard refuses it (and any other
    connection that is not to this machine) and records it in ``net_log``."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES) or k in ENV_PROMPTFOO_SETTINGS}
    guard = str(offline_guard()).replace("\\", "\\\\").replace('"', '\\"')
    env["NODE_OPTIONS"] = (env.get("NODE_OPTIONS", "") + f' --require "{guard}"').strip()
    return env | OFFLINE_ENV | {"OPENSEM_NET_LOG": str(net_log)} | extra


def test_keys(n: int) -> list[str]:
    """Opaque, generated test keys: the only thing promptfoo templates."""
    return [f"t{i + 1:04d}" for i in range(n)]


class JudgeServer:
    """Serves verdicts to promptfoo's grader: POST {"key", "output"} + token -> {"score", "reason"} or {"error"}.

    ``score(key, output)`` looks everything up by the opaque key. A request without the run's token gets 403."""

    def __init__(self, score: Callable[[str, str], dict]):
        score_fn = score
        self.token = secrets.token_urlsafe(32)
        token = self.token.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                given = (self.headers.get("X-OpenSEM-Token") or "").encode()
                if not hmac.compare_digest(given, token):
                    return self._send(403, {"error": "forbidden"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    result = score_fn(str(body["key"]), body.get("output") or "")
                except Exception as e:  # the grader turns this into a promptfoo error, never a zero
                    result = {"error": f"{type(e).__name__}: {e}"}
                self._send(200, result)

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/grade"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_config(run_dir: Path, label: str, keys: list[str], pass_threshold: int, description: str,
                 concurrency: int, extra_rows: Optional[dict[str, str]] = None) -> Path:
    """The promptfoo config: opaque keys only. ``label`` and ``description`` must be our own fixed words.
    ``extra_rows``: more providers, label -> the file (in the run folder) of their answers by key."""
    files = resources.files("opensem") / "assets" / "promptfoo"
    for name in ("provider.py", "grader.py"):
        (run_dir / name).write_text((files / name).read_text(encoding="utf-8"), encoding="utf-8")
    config = {
        "description": description,
        "prompts": ["{{key}}"],
        "providers": [{"id": "file://provider.py", "label": label}] + [
            {"id": "file://provider.py", "label": row, "config": {"answers": file}} for row, file in (extra_rows or {}).items()],
        "defaultTest": {"assert": [{"type": "python", "value": "file://grader.py"}],
                        "metadata": {"pass_threshold": pass_threshold}},
        "tests": [{"description": k, "vars": {"key": k}} for k in keys],
        "evaluateOptions": {"maxConcurrency": concurrency},
    }
    path = run_dir / "promptfooconfig.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_eval(cmd: list[str], config: Path, output: Path, server: JudgeServer, answers_file: Path, python: str, log: Path,
             store: Optional[Path] = None) -> dict:
    """promptfoo keeps the eval in ``store`` (its PROMPTFOO_CONFIG_DIR; the workspace's .opensem/promptfoo), one
    per workspace, so that two judge runs in two workspaces never share a database:
    `PROMPTFOO_CONFIG_DIR=.opensem/promptfoo npx promptfoo view` shows them."""
    extra = {
        "OPENSEM_JUDGE_URL": server.url,
        "OPENSEM_JUDGE_TOKEN": server.token,
        "OPENSEM_ANSWERS": str(answers_file),
        "PROMPTFOO_PYTHON": python,
    }
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        extra["PROMPTFOO_CONFIG_DIR"] = str(store)
    env = minimal_env(extra, net_log=config.parent / "network_refused.jsonl")
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


def check_complete(data: dict, keys: list[str], labels: list[str], where: Path) -> None:
    """Every golden key has exactly one result in every row, or the run is refused: a result lost or doubled
    would change the paired comparison without a word."""
    for label in labels:
        seen: dict[str, int] = {}
        for r in (data.get("results") or {}).get("results") or []:
            if (r.get("provider") or {}).get("label") == label or (len(labels) == 1 and not (r.get("provider") or {}).get("label")):
                k = str((r.get("vars") or {}).get("key"))
                seen[k] = seen.get(k, 0) + 1
        missing = [k for k in keys if k not in seen]
        doubled = sorted(k for k, n in seen.items() if n > 1)
        unknown = sorted(k for k in seen if k not in set(keys))
        if missing or doubled or unknown:
            what = "; ".join(x for x in (
                f"{len(missing)} golden key(s) with no result: {', '.join(missing[:8])}" if missing else "",
                f"key(s) with more than one result: {', '.join(doubled[:8])}" if doubled else "",
                f"key(s) not in this run: {', '.join(unknown[:8])}" if unknown else "") if x)
            raise OpenSEMError(f"{where}: promptfoo's output for {label!r} is incomplete ({what}): nothing was reported; "
                               f"run the judge again")


def parse_results(data: dict, label: Optional[str] = None) -> dict[str, dict]:
    """Per test key: output, score (1-5 or None), pass, reason, error: straight from promptfoo's JSON
    (of the provider row ``label`` when the eval has several)."""
    out: dict[str, dict] = {}
    for r in data["results"]["results"]:
        if label is not None and (r.get("provider") or {}).get("label") != label:
            continue
        item_id = r["vars"]["key"]
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
