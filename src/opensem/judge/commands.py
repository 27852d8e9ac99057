"""`opensem judge`: the baseline and the fine-tuned model judged on the golden set, or the judges calibrated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from opensem.commands import SetOpt, WorkspaceOpt, open_workspace, out
from opensem.errors import OpenSEMError


def judge(
    mode: Annotated[Optional[str], typer.Option(help="baseline | fine-tuned")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="Adapter name or path (default: the latest)")] = None,
    gguf: Annotated[Optional[Path], typer.Option(
        "--gguf", help="With --mode fine-tuned: answer with this exported GGUF of the adapter's run (llama.cpp), the model that ships")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Report each judge's agreement with human scores (the shipped set, or FILE) and keep it in evals/reports/calibration.json")] = False,
    file: Annotated[Optional[Path], typer.Argument(
        help="With --calibrate: your own human-scored answers, a JSON list of {question, golden, candidate, human_score 1-5}",
        show_default=False)] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Stages 2 and 4: answer the golden set, score 1-5 through promptfoo, print Baseline vs Fine-Tuned."""
    from opensem.judge import run_calibration, run_judge
    from opensem.judge.stage import judge_result
    from opensem.stages import remember

    ws = open_workspace(workspace, sets, lock="judge")
    if file is not None and not calibrate:
        raise OpenSEMError(f"{file}: a file argument is only for --calibrate (opensem judge --calibrate {file})")
    if calibrate:
        run_calibration(ws, file, console=out)
        return
    if mode not in ("baseline", "fine-tuned"):
        raise OpenSEMError("--mode must be 'baseline' or 'fine-tuned' (or use --calibrate)")
    remember(ws, judge_result(ws, mode, run_judge(ws, mode=mode, adapter=adapter, console=out, gguf=gguf)), f"opensem judge --mode {mode}")
