"""What the judge said of a trained run, as the steps after it read it: the newest judge results whose lineage names
the adapter's hash, and the row the judge recommends shipping (fine-tuned or base model, with or without retrieval).

`opensem export` adds the retrieval index when that row uses retrieval, `opensem serve` and `opensem ask` answer as
that row unless told otherwise (--retrieval / --no-retrieval), `opensem push` uploads what the export holds, and
the model card names the row with its judged figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from opensem.lineage import read_json
from opensem.workspace import Workspace


def judged(ws: Workspace, adapter_sha: str) -> Optional[dict]:
    """The judge's latest results for this adapter, or None: the last finished `preferred` or `fine-tuned` stage when
    it judged this adapter, else the newest of the judge's results files (evals/reports/*/results.json) whose lineage
    names it, so that a run judged before another one still has its numbers."""
    from opensem.stages import load_stage, recall

    for name in ("preferred", "fine-tuned"):
        result = recall(ws, name)
        if result is None:
            continue
        details = load_stage(name).details(ws, result)
        if _names(details, adapter_sha):
            return details
    reports = ws.path(ws.eval_config().reports_dir)
    for path in sorted(reports.glob("*/results.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        details = read_json(path, None)
        if isinstance(details, dict) and _names(details, adapter_sha):
            return details
    return None


def _names(details: dict, adapter_sha: str) -> bool:
    """A judge's results for this adapter, compared with a baseline."""
    return adapter_sha in str((details.get("lineage") or {}).get("adapter", "")) and bool(details.get("comparison"))


def recommended(ws: Workspace, adapter_dir: Path) -> Optional[dict]:
    """The row the judge recommends for this run (its ``recommended`` record), or None when it was not judged with
    the retrieval rows."""
    from opensem.adapters import adapter_hash

    res = judged(ws, adapter_hash(adapter_dir))
    return (res or {}).get("recommended")


def answer_with_retrieval(ws: Workspace, adapter_dir: Optional[Path], asked: Optional[bool], say) -> bool:
    """Whether to put passages in the prompt: as asked (--retrieval / --no-retrieval), else as the recommended row
    does; ``say`` gets one line naming the row and how to override it."""
    if asked is not None or adapter_dir is None:
        return bool(asked)
    rec = recommended(ws, adapter_dir)
    if not rec:
        return False
    if not rec["fine_tuned"]:
        say(f"the judge found this run no better than {rec['label']} (the base model): answering with the fine-tuned "
            f"model{' and retrieval' if rec['retrieval'] else ''} all the same")
    else:
        say(f"answering as the judge's recommended row, {rec['label']} ({'--no-retrieval' if rec['retrieval'] else '--retrieval'} "
            f"to change)")
    return bool(rec["retrieval"])
