"""`opensem forge`: the Data Forge from the command line (also `python src/forge.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from opensem.commands import SetOpt, WorkspaceOpt, console, open_workspace


def forge(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and estimated cost; call nobody")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Stage 1: data/raw -> data/processed/train.jsonl + test.jsonl, via the configured teacher."""
    from opensem.forge.stage import forge_result, run_forge
    from opensem.stages import remember

    ws = open_workspace(workspace, sets, lock=None if dry_run else "forge")
    run_forge(ws, dry_run=dry_run, console=console)
    if not dry_run:
        remember(ws, forge_result(ws, ws.forge_config()), "opensem forge")
