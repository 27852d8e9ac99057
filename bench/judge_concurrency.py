"""An LLM judge against an OpenAI-compatible server on 127.0.0.1 that adds 200 ms to each call: 64 golden
items graded at `judge.concurrency` 16 against 1, measured side by side in one run, two ways:

  1. the judge's batch call (`score_many` -> the provider's `complete_many`), as the forgetting check and
     `--calibrate` use it;
  2. a whole `opensem judge --mode baseline` run, where promptfoo grades with maxConcurrency = judge.concurrency
     (the model's answers are generated once and cached, so both runs time the grading).

    python bench/judge_concurrency.py [--items 64] [--delay 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import scratch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402
from fakes import FakeServer  # noqa: E402
from rich.console import Console  # noqa: E402

from opensem.judge import run_judge  # noqa: E402
from opensem.judge.scorers import make_judge  # noqa: E402
from opensem.models import resolve_base_model  # noqa: E402
from opensem.workspace import Workspace, init_workspace  # noqa: E402

EMBEDDED = "smollm2-135m-instruct"


def workspace(root: Path, name: str, fake: FakeServer, concurrency: int, golden: list, base_models: Path) -> Path:
    ws = root / name
    init_workspace(ws)
    (ws / "models/base" / EMBEDDED).symlink_to(base_models / EMBEDDED, target_is_directory=True)
    (ws / "evals/golden_set.json").write_text(json.dumps(golden))
    cfg = yaml.safe_load((ws / "configs/eval_config.yaml").read_text())
    cfg["judge"] = {"provider": "openai-compatible", "base_url": fake.openai_url, "model": "judge", "concurrency": concurrency,
                    "max_retries": 2, "timeout_s": 30}
    cfg["answers"] = {"max_new_tokens": 24, "batch_size": 16}
    cfg["forgetting_set"] = None
    cfg["bootstrap_samples"] = 200
    (ws / "configs/eval_config.yaml").write_text(yaml.safe_dump(cfg))
    return ws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--delay", type=float, default=0.2)
    a = ap.parse_args()
    scratch.use("bench-judge-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PROMPTFOO_CONFIG_DIR", tempfile.mkdtemp(prefix="bench-promptfoo-"))
    quiet = Console(quiet=True)
    src = json.loads((REPO / "examples/product-manual/evals/golden_set.json").read_text())
    golden = [dict(src[i % len(src)], id=f"g{i:03d}", question=f"{src[i % len(src)]['question']} (#{i})") for i in range(a.items)]
    root = Path(tempfile.mkdtemp(prefix="bench-judge-"))
    base_models = root / "base"
    resolve_base_model(EMBEDDED, base_models)
    fake = FakeServer()
    fake.behaviour.reply = lambda body: json.dumps({"reason": "matches the reference on the key fact", "score": 4})
    fake.behaviour.delay_s = a.delay
    items = [(g["question"], g["answer"], "a candidate answer") for g in golden]

    batch, full = {}, {}
    for c in (1, 16):
        ws = workspace(root, f"batch-c{c}", fake, c, golden, base_models)
        judge = make_judge(Workspace(ws).eval_config().judge, Workspace(ws))
        before = fake.calls["/v1/chat/completions"]
        t = time.perf_counter()
        verdicts = judge.score_many(items)
        batch[c] = time.perf_counter() - t
        assert all(v.score == 4 for v in verdicts), [v.error for v in verdicts if v.error][:3]
        print(f"score_many, concurrency {c:2d}: {fake.calls['/v1/chat/completions'] - before} calls, {batch[c]:.2f} s "
              f"(max {fake.max_in_flight} in flight)")
        fake.max_in_flight = 0

    answers = None
    for c in (1, 16):
        ws = workspace(root, f"full-c{c}", fake, c, golden, base_models)
        if answers is None:  # generate the model's answers once; both timed runs read them from the cache
            run_judge(Workspace(ws), "baseline", console=quiet)
            answers = ws / ".opensem/cache/answers"
            shutil.rmtree(ws / ".opensem/cache/judge")
        else:
            shutil.copytree(answers, ws / ".opensem/cache/answers")
        fake.max_in_flight = 0
        t = time.perf_counter()
        res = run_judge(Workspace(ws), "baseline", console=quiet)
        full[c] = time.perf_counter() - t
        assert res["summary"]["scored"] == a.items, res["summary"]
        print(f"opensem judge via promptfoo, judge.concurrency {c:2d}: {full[c]:.2f} s (max {fake.max_in_flight} in flight)")
    fake.close()
    shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{a.items} items, {a.delay * 1000:.0f} ms per judge call, concurrency 16 vs 1:")
    print(f"  judge batch call (score_many): {batch[1]:.2f} s vs {batch[16]:.2f} s = {batch[1] / batch[16]:.1f}x (target >= 10x)")
    print(f"  whole judge run via promptfoo: {full[1]:.2f} s vs {full[16]:.2f} s = {full[1] / full[16]:.1f}x")


if __name__ == "__main__":
    main()
