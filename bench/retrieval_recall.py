"""Recall@k of the judge's retrieval on every corpus with a golden set: dense (MiniLM embeddings), BM25 and the two
fused (hybrid), side by side on the same chunks and questions. The real corpora (corpora/) choose the method; the
fiction (examples/) is shown for regression. No language model runs: only the embedder and BM25.

    python bench/retrieval_recall.py [--k 1 3 5]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def corpora() -> list[Path]:
    return sorted(p for p in (REPO / "corpora").iterdir() if (p / "evals/golden_set.json").exists()) + \
        sorted(p for p in (REPO / "examples").iterdir() if (p / "evals/golden_set.json").exists())


def main() -> int:
    from opensem.golden import load_golden
    from opensem.retrieval import METHODS, Index, holds_answer
    from opensem.workspace import Workspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    a = ap.parse_args()
    opensem = str(Path(sys.executable).with_name("opensem"))
    rows, sums = [], {(m, k): [] for m in METHODS for k in a.k}
    with tempfile.TemporaryDirectory(prefix="bench-recall-") as tmp:
        for src in corpora():
            ws = Path(tmp) / src.name
            subprocess.run([opensem, "init", str(ws)], check=True, capture_output=True)
            for sub in ("data/raw", "evals"):
                shutil.copytree(src / sub, ws / sub, dirs_exist_ok=True)
            w = Workspace(ws)
            index = Index.build(w)
            items = load_golden(ws / "evals/golden_set.json")
            cells = []
            for m in METHODS:
                found = index.search([it.question for it in items], max(a.k), m)
                for k in a.k:
                    r = sum(holds_answer(it.question, it.answer, ps[:k]) for it, ps in zip(items, found)) / len(items)
                    cells.append(f"{r:6.1%}")
                    if src.parent.name == "corpora":
                        sums[(m, k)].append(r)
            rows.append((f"{src.parent.name}/{src.name}", len(index.passages), len(items), cells))
    head = "  ".join(f"{m}@{k}".rjust(9) for m in METHODS for k in a.k)
    print(f"{'corpus':34} {'chunks':>6} {'qs':>4}  {head}")
    for name, n, q, cells in rows:
        print(f"{name:34} {n:6d} {q:4d}  " + "  ".join(c.rjust(9) for c in cells))
    mean = "  ".join(f"{sum(sums[(m, k)]) / max(1, len(sums[(m, k)])):9.1%}" for m in METHODS for k in a.k)
    print(f"{'mean of the real corpora':34} {'':6} {'':4}  {mean}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
