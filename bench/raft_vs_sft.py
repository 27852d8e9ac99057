"""RAFT against plain SFT on an example corpus: both adapters judged with and without retrieval, in one fresh
workspace, paired on the same golden questions with the same judge.

    python bench/raft_vs_sft.py [--example product-manual] [--keep DIR] [--set train.exposures_per_fact=12 ...]
    python bench/raft_vs_sft.py --report DIR     # the same tables from a kept workspace, nothing run

Two `opensem run`s with `eval.retrieval.enabled=true`: the recipe's defaults (plain SFT), then the same with
`train.raft.enabled=true` (forge and baseline are reused, as their inputs did not change). Prints, for each
adapter, the four rows (accuracy and mean score with their 95% CIs), recall@k, the judge's recommendation and the
training time; then `opensem runs --compare SFT RAFT`: RAFT against SFT on every row, paired.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RETRIEVAL = ["--set", "eval.retrieval.enabled=true"]
RAFT = ["--set", "train.raft.enabled=true", "--set", "train.sequence_len=1024"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", default="product-manual")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], help="a config override for both runs (repeatable)")
    ap.add_argument("--report", type=Path, help="print the tables of a workspace run before (with --keep), run nothing")
    a = ap.parse_args()
    opensem = str(Path(sys.executable).with_name("opensem"))
    if a.report:
        return report(opensem, a.report)
    ws = a.keep or Path(tempfile.mkdtemp(prefix="bench-raft-")) / "ws"
    if ws.exists():
        sys.exit(f"{ws} exists: give --keep a new folder")
    subprocess.run([opensem, "init", str(ws), "--example", a.example], check=True, capture_output=True)
    sets = [x for kv in a.set for x in ("--set", kv)]
    for name, extra in (("sft", []), ("raft", RAFT)):
        t = time.perf_counter()
        r = subprocess.run([opensem, "run", "-w", str(ws)] + RETRIEVAL + extra + sets, capture_output=True, text=True)
        print(f"{name}: opensem run {time.perf_counter() - t:.0f} s")
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:])
            return r.returncode
    return report(opensem, ws)


def report(opensem: str, ws: Path) -> int:
    """The last two runs of the workspace: SFT first, RAFT second."""
    manifests = sorted((ws / "runs").glob("*/run_manifest.json"))[-2:]
    if len(manifests) < 2:
        sys.exit(f"{ws}: two runs are needed (plain SFT, then RAFT); found {len(manifests)}")
    runs = [json.loads(p.read_text()) for p in manifests]
    base = runs[0]["baseline"]
    print(f"{ws.name}: {base['summary']['n']} golden questions; recall@{base['retrieval']['top_k']} "
          f"{base['retrieval']['recall_at_k']:.1%}")
    rows = [("Baseline", base["summary"]), ("Baseline + retrieval", base["retrieval"]["summary"])]
    for label, m in zip(("SFT", "RAFT"), runs):
        ft = m["fine_tuned"]
        rows += [(label, ft["summary"]), (f"{label} + retrieval", ft["retrieval"]["summary"])]
    print(f"{'row':22} {'accuracy [95% CI]':24} mean score [95% CI]")
    for label, s in rows:
        lo, hi = s["accuracy_ci"]
        mlo, mhi = s["mean_score_ci"]
        print(f"{label:22} {s['accuracy']:6.1%} [{lo:.1%}, {hi:.1%}]   {s['mean_score']:.2f} [{mlo:.2f}, {mhi:.2f}]")
    for label, m in zip(("SFT", "RAFT"), runs):
        adapter = json.loads((ws / "models/adapters" / m["train"]["run_name"] / "manifest.json").read_text())
        raft = adapter.get("raft") or {}
        print(f"{label} ({m['train']['run_name']}): training {m['stages']['train']['seconds']:.0f} s"
              + (f", {raft.get('with_source', 0)} examples with their source chunk, {raft.get('distractors_only', 0)} "
                 f"with distractors only" if raft else "") + f"; {m['fine_tuned'].get('recommendation') or ''}")
    cmp = subprocess.run([opensem, "runs", "-w", str(ws), "--compare", runs[0]["run_id"], runs[1]["run_id"]],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    print(cmp.stdout + cmp.stderr)
    return cmp.returncode


if __name__ == "__main__":
    sys.exit(main())
