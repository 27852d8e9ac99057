"""Judge answer generation on the CPU: a golden set of 64 questions answered in batches against one at a
time (same model, greedy, same max tokens), then the wall time of a full baseline judge run (answers,
promptfoo, offline judge, report) on the example workspace.

    python bench/judge_batching.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402

from opensem.inference import ChatModel  # noqa: E402
from opensem.models import resolve_base_model  # noqa: E402


def main() -> None:
    base = resolve_base_model("smollm2-135m-instruct", REPO / "models/base")
    golden = json.loads((REPO / "examples/product-manual/evals/golden_set.json").read_text())
    general = json.loads((REPO / "src/opensem/assets/judge/general_knowledge.json").read_text())
    questions = [g["question"] for g in golden + general][:64]
    convs = [[{"role": "user", "content": q}] for q in questions]
    model = ChatModel(base.path)
    model.generate(convs[:2], max_new_tokens=8)  # warm-up
    t = time.perf_counter()
    batched = model.generate(convs, max_new_tokens=64, batch_size=16)
    tb = time.perf_counter() - t
    t = time.perf_counter()
    single = [model.generate([c], max_new_tokens=64)[0] for c in convs]
    ts = time.perf_counter() - t
    same = sum(a.text == b.text for a, b in zip(batched, single))
    toks = sum(o.completion_tokens for o in batched)
    print(f"{len(convs)} questions, greedy, max 64 new tokens, {toks} tokens generated")
    print(f"one at a time: {ts:.1f} s   batched (16): {tb:.1f} s   -> {ts / tb:.1f}x faster (target >= 4x); "
          f"identical answers: {same}/{len(convs)}")

    from opensem.judge import run_judge
    from opensem.workspace import Workspace, init_workspace

    ws = Path(tempfile.mkdtemp(prefix="bench-judge-"))
    init_workspace(ws, example="product-manual")
    (ws / "models/base/smollm2-135m-instruct").symlink_to(base.path)
    t = time.perf_counter()
    res = run_judge(Workspace(ws), "baseline", console=Console(quiet=True))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    run_judge(Workspace(ws), "baseline", console=Console(quiet=True))
    warm = time.perf_counter() - t
    print(f"full baseline judge run ({res['summary']['n']} golden + 20 general questions, promptfoo, offline judge): "
          f"{cold:.1f} s; again with cached answers: {warm:.1f} s")
    shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
