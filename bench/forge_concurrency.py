"""Forge reliability and speed against a teacher that adds 200 ms to each call (a fake OpenAI-compatible
server on 127.0.0.1): wall time at concurrency 16 against concurrency 1 on the same work, then the calls
a rerun makes (the reply cache should make it zero).

    python bench/forge_concurrency.py [--docs 48]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import scratch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from fakes import FakeServer  # noqa: E402

from opensem.forge import run_forge  # noqa: E402
from opensem.workspace import Workspace, init_workspace  # noqa: E402
from rich.console import Console  # noqa: E402
import yaml  # noqa: E402


def workspace(fake: FakeServer, concurrency: int, docs: int) -> Path:
    ws = Path(tempfile.mkdtemp(prefix=f"bench-forge-c{concurrency}-"))
    init_workspace(ws)
    src = sorted((REPO / "examples/product-manual/data/raw").glob("*.md"))
    for i in range(docs):
        f = src[i % len(src)]
        (ws / "data/raw" / f"{i:02d}-{f.name}").write_text(f.read_text().replace("C-300", f"C-{300 + i}"))
    cfg = yaml.safe_load((ws / "configs/forge_config.yaml").read_text())
    cfg["teacher"] = {"provider": "openai-compatible", "base_url": fake.openai_url, "model": "gpt-4o-mini",
                      "concurrency": concurrency, "max_retries": 2, "timeout_s": 30}
    cfg["generation"] = {"pairs_per_chunk": 3}
    (ws / "configs/forge_config.yaml").write_text(yaml.safe_dump(cfg))
    return ws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=48)
    a = ap.parse_args()
    scratch.use("bench-forge-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet = Console(quiet=True)
    fake = FakeServer()
    fake.behaviour.delay_s = 0.2
    times = {}
    for c in (1, 16):
        ws = workspace(fake, c, a.docs)
        before = fake.calls["/v1/chat/completions"]
        t = time.perf_counter()
        m = run_forge(Workspace(ws), console=quiet)
        times[c] = time.perf_counter() - t
        calls = fake.calls["/v1/chat/completions"] - before
        print(f"concurrency {c:2d}: {calls} calls, {m['counts']['kept']} pairs kept, {times[c]:.2f} s")
        if c == 16:
            before = fake.calls["/v1/chat/completions"]
            t = time.perf_counter()
            run_forge(Workspace(ws), console=quiet)
            rerun = fake.calls["/v1/chat/completions"] - before
            print(f"rerun of the same work: {rerun} calls, {time.perf_counter() - t:.2f} s")
    fake.close()
    print()
    print(f"wall time, 200 ms per call: concurrency 1 {times[1]:.2f} s, concurrency 16 {times[16]:.2f} s: "
          f"{times[1] / times[16]:.1f}x faster (target >= 12x); rerun calls: {rerun} (target 0)")


if __name__ == "__main__":
    main()
