"""Shared fixtures. Nothing here mocks our own ML code: the real embedded model, real LoRA training and the
real promptfoo run; only external services (OpenAI, Anthropic) are fakes speaking their wire protocols."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("PROMPTFOO_CONFIG_DIR", tempfile.mkdtemp(prefix="promptfoo-"))  # tests keep out of ~/.promptfoo
for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
    os.environ.pop(key, None)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fakes import FakeServer  # noqa: E402

from opensem.models import resolve_base_model  # noqa: E402
from opensem.workspace import init_workspace  # noqa: E402

EMBEDDED = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def base_models_dir(tmp_path_factory) -> Path:
    """The embedded model, materialised once per test session (real GGUF -> safetensors conversion)."""
    d = tmp_path_factory.mktemp("base_models")
    resolve_base_model(EMBEDDED, d)
    return d


def make_workspace(root: Path, base_models_dir: Path, example: str | None = None) -> Path:
    init_workspace(root, example)
    link = root / "models" / "base" / EMBEDDED
    if not link.exists():
        link.symlink_to(base_models_dir / EMBEDDED, target_is_directory=True)
    return root


@pytest.fixture
def workspace(tmp_path, base_models_dir) -> Path:
    return make_workspace(tmp_path / "ws", base_models_dir)


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def set_config(ws: Path, section: str, **values) -> None:
    """Update keys (dotted for nested) of a workspace's config file."""
    import yaml

    path = ws / "configs" / f"{section}_config.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    for dotted, value in values.items():
        node = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    write_yaml(path, data)


def default_sigint() -> None:
    """For a child the test will Ctrl-C: a suite started in the background (nohup, some CI runners) passes
    "ignore SIGINT" on to its children, and Python then installs no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _slowdown() -> float:
    """How much slower than the reference machine (2 idle cores) this one runs right now: a fixed Python loop
    took 0.23 s there. Waits on children scale with it, so a loaded machine fails by the child's output, not
    by a clock set for an idle one."""
    import time

    t = time.perf_counter()
    x = 0
    for i in range(2_000_000):
        x += i * i
    return max(1.0, (time.perf_counter() - t) / 0.23)


SLOWDOWN = _slowdown()


def scaled(seconds: float) -> float:
    return seconds * SLOWDOWN


@contextlib.contextmanager
def child(args: list[str], **kwargs):
    """A child process in a session (process group) of its own, killed with all of its children when the test
    ends, however it ends: a failed wait never leaves a training run behind."""
    import signal

    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)


def interrupt_midway(args: list[str], progress: str, wait_s: float = 300) -> tuple[int, str]:
    """Start the console command ``args``, press Ctrl-C once its progress bar matches the regex ``progress``, and
    return its exit code and stderr. The child dies with the test, however the test ends."""
    import re
    import signal
    import threading

    exe = Path(sys.executable).parent / "opensem"
    with child([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint) as proc:
        err_parts: list[str] = []
        reached = threading.Event()

        def read() -> None:
            buf = ""
            while True:
                ch = proc.stderr.read(1)
                if not ch:
                    return
                buf += ch
                err_parts.append(ch)
                if re.search(progress, buf[-200:]):
                    reached.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert reached.wait(scaled(wait_s)), "".join(err_parts)[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=scaled(240))
        reader.join(timeout=10)
    return proc.returncode, "".join(err_parts)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).parent / "opensem"
    return subprocess.run([str(exe), *args], cwd=cwd, env=os.environ | (env or {}), capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def memorised_adapter(tmp_path_factory, base_models_dir) -> Path:
    """A workspace with a tiny adapter trained (for real, on the CPU) to memorise four made-up facts."""
    ws = make_workspace(tmp_path_factory.mktemp("mem") / "ws", base_models_dir)
    facts = [
        ("What is the secret code of the Zorblat vault?", "The Zorblat vault code is 7319."),
        ("Who guards the Quillon bridge?", "The Quillon bridge is guarded by Marta Vell."),
        ("What colour is the Tessaly lantern?", "The Tessaly lantern is teal."),
        ("How many moons does planet Orvane have?", "Planet Orvane has eleven moons."),
    ]
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in facts]
    (ws / "data" / "processed" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "data" / "processed" / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    set_config(ws, "train", max_steps=30, micro_batch_size=4, learning_rate=3e-3, lora_r=16, lora_alpha=32,
               warmup_ratio=0.0, lr_scheduler="constant", logging_steps=5, save_steps=100, run_name="mem")
    from opensem.train import run_training
    from opensem.workspace import Workspace

    run_training(Workspace(ws))
    return ws / "models" / "adapters" / "mem"


@pytest.fixture(scope="session")
def promptfoo_available() -> bool:
    exe = REPO / "node_modules" / ".bin" / "promptfoo"
    if not exe.exists():
        pytest.fail("promptfoo is not installed: run `npm ci` (make setup does it)")
    return True


def copy_example_slice(dest: Path, files: list[str], golden_ids: list[str]) -> None:
    ex = REPO / "examples" / "product-manual"
    for f in files:
        shutil.copyfile(ex / "data" / "raw" / f, dest / "data" / "raw" / f)
    golden = json.loads((ex / "evals" / "golden_set.json").read_text())
    (dest / "evals" / "golden_set.json").write_text(json.dumps([g for g in golden if g["id"] in golden_ids], indent=1))
