"""An example corpus end to end, as a user's first run: a fresh workspace, `opensem run` on the embedded defaults
(forge -> baseline -> train -> fine-tuned -> report), nothing cached. Prints each stage's time, the whole run's
wall time against the 10-minute target, the facts trained and how often each was seen, and the paired result (mean
score difference and its 95% CI).

    python bench/example_end_to_end.py [--example island-ferry] [--keep DIR] [--set train.exposures_per_fact=12 ...]
    python bench/example_end_to_end.py --report DIR     # the same summary of a kept workspace, nothing run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 600


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", default="island-ferry")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one, removed)")
    ap.add_argument("--set", action="append", default=[], help="a config override passed to `opensem run` (repeatable)")
    ap.add_argument("--report", type=Path, help="print the summary of a workspace run before (with --keep), run nothing")
    a = ap.parse_args()
    if a.report:
        summarize(a.report, words_of(a.report / "data/raw"), None)
        return 0
    opensem = str(Path(sys.executable).with_name("opensem"))
    ws = a.keep or Path(tempfile.mkdtemp(prefix="bench-e2e-")) / "ws"
    if ws.exists():
        sys.exit(f"{ws} exists: give --keep a new folder")
    words = words_of(REPO / "examples" / a.example / "data/raw")
    subprocess.run([opensem, "init", str(ws), "--example", a.example], check=True, capture_output=True)
    t = time.perf_counter()
    r = subprocess.run([opensem, "run", "-w", str(ws)] + [x for kv in a.set for x in ("--set", kv)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-3000:])
        return r.returncode
    summarize(ws, words, wall)
    if not a.keep:
        shutil.rmtree(ws.parent, ignore_errors=True)
    return 0


def words_of(raw: Path) -> int:
    return sum(len(p.read_text(errors="ignore").split()) for p in raw.glob("*.md"))


def summarize(ws: Path, words: int, wall: float | None) -> None:
    """Stage times, facts and exposures, and the paired result of the workspace's last run."""
    state = {k: v for k, v in json.loads((ws / ".opensem/pipeline_state.json").read_text()).items()
             if isinstance(v, dict) and "seconds" in v}  # the stages' records (the file keeps the run's results too)
    fm = json.loads((ws / "data/processed/forge_manifest.json").read_text())
    forge, cov = fm["counts"], fm.get("coverage") or {}
    adapter = max((ws / "models/adapters").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    length = json.loads(adapter.read_text()).get("length") or {}
    cmp = json.loads((ws / "evals/reports/fine-tuned-latest.json").read_text())["comparison"]
    print(f"{ws.name}: {words} words of Markdown, {forge['chunks']} chunks, {forge['requests']} teacher calls, "
          f"{forge['train']} training pairs")
    if cov:
        print(f"facts trained: {cov['trained']} of {cov['facts']}, {cov['train_wordings_per_fact']} wordings each; "
              f"{length.get('steps')} steps, {length.get('exposures_per_fact') or 0:.1f} exposures per fact (set by {length.get('by')})")
    for name, s in state.items():
        print(f"  {name:11} {s['seconds']:7.1f} s")
    print(f"  {'stages':11} {sum(s['seconds'] for s in state.values()):7.1f} s")
    if wall is not None:
        print(f"  {'opensem run':11} {wall:7.1f} s wall ({'within' if wall <= TARGET_S else 'OVER'} the {TARGET_S // 60}-minute target)")
    lo, hi = cmp["mean_diff_ci"]
    print(f"mean score difference (fine-tuned - baseline, paired, {cmp['paired_n']} questions): {cmp['mean_diff']:+.2f}, "
          f"95% CI [{lo:+.2f}, {hi:+.2f}] ({'excludes' if lo > 0 else 'does NOT exclude'} zero); "
          f"accuracy {cmp['accuracy_baseline']:.1%} -> {cmp['accuracy_fine_tuned']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
