"""`opensem train`: instruction tuning from the command line (also `python src/train.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from opensem.commands import SetOpt, WorkspaceOpt, console, open_workspace


def train(
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last interrupted run from its checkpoint")] = False,
    run_name: Annotated[Optional[str], typer.Option(help="Adapter folder name under models/adapters")] = None,
    from_cpt: Annotated[Optional[str], typer.Option(
        "--from-cpt", help="Start from a continued pre-training run (its name in models/cpt, or 'latest'); after_cpt says how")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """Stage 3: LoRA fine-tuning from configs/train_config.yaml -> models/adapters/{run_name}."""
    from opensem.adapters import adapter_result
    from opensem.stages import remember
    from opensem.train import run_training
    from opensem.train.stage import train_summary

    ws = open_workspace(workspace, sets, lock="train")
    chain = None
    if from_cpt and not resume:
        from opensem.cpt.stage import chain_from, find_cpt

        chain = chain_from(find_cpt(ws, None if from_cpt == "latest" else from_cpt), ws.train_config().after_cpt)
    run_dir = run_training(ws, resume=resume, run_name=run_name, console=console, chain=chain)
    remember(ws, by="opensem train", make=lambda: adapter_result(ws, run_dir, "train", train_summary))
