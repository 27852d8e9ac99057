"""`opensem cpt`: continued pre-training from the command line (also `python src/cpt.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from opensem.commands import SetOpt, WorkspaceOpt, console, open_workspace


def cpt(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the corpus plan and the rewrites' estimated cost; train nothing")] = False,
    corpus_only: Annotated[bool, typer.Option("--corpus-only", help="Build data/processed/cpt.jsonl (and its rewrites) and stop")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last interrupted run from its checkpoint")] = False,
    run_name: Annotated[Optional[str], typer.Option(help="Adapter folder name under models/cpt")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Continued pre-training on the raw documents (configs/cpt_config.yaml) -> models/cpt/{run_name}."""
    ws = open_workspace(workspace, sets, lock=None if dry_run else "cpt")
    if dry_run or corpus_only:
        from opensem.cpt.corpus import build_corpus

        corpus = build_corpus(ws, ws.cpt_config(), console, dry_run=dry_run)
        if corpus:
            console.print(f"corpus written to {ws.cpt_config().corpus}: {corpus.counts}")
        return
    from opensem.adapters import adapter_result
    from opensem.cpt import run_cpt
    from opensem.cpt.stage import cpt_summary
    from opensem.stages import remember

    run_dir = run_cpt(ws, resume=resume, run_name=run_name, console=console)
    remember(ws, by="opensem cpt", make=lambda: adapter_result(ws, run_dir, "cpt", cpt_summary))
