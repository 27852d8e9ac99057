"""`opensem pairs` and `opensem prefer`: preference pairs and preference tuning from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from opensem.commands import SetOpt, WorkspaceOpt, console, open_workspace


def pairs(
    adapter: Annotated[Optional[str], typer.Option(help="The instruction-tuned adapter (name or path; default: the latest)")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Preference pairs: the tuned model's own wrong answers to training questions vs the grounded ones -> preferences.jsonl."""
    from opensem.adapters import find_adapter
    from opensem.prefs import build_pairs
    from opensem.prefs.stage import pairs_result
    from opensem.stages import remember

    ws = open_workspace(workspace, sets, lock="pairs")
    remember(ws, pairs_result(ws, build_pairs(ws, find_adapter(ws, ws.train_config(), adapter), console)), "opensem pairs")


def prefer(
    adapter: Annotated[Optional[str], typer.Option(help="The instruction-tuned adapter to start from (default: the latest)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last interrupted run from its checkpoint")] = False,
    run_name: Annotated[Optional[str], typer.Option(help="Adapter folder name under models/preference")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Preference tuning (DPO or ORPO, configs/preference_config.yaml) on the pairs -> models/preference/{run_name}."""
    from opensem.adapters import adapter_result, find_adapter
    from opensem.prefs import run_preference
    from opensem.prefs.stage import preference_summary
    from opensem.stages import remember

    ws = open_workspace(workspace, sets, lock="prefer")
    sft = None if resume else find_adapter(ws, ws.train_config(), adapter)
    run_dir = run_preference(ws, sft, resume=resume, run_name=run_name, console=console)
    remember(ws, by="opensem prefer", make=lambda: adapter_result(ws, run_dir, "preference", preference_summary))
