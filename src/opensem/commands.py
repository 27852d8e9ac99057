"""What every `opensem` command shares: the --workspace and --set options, opening a workspace (its configs checked,
its lock held when the command writes), the two consoles, and the one-line check of a choice.

A stage brings its own commands (``commands = {"train": train}`` on the stage, typer functions written with these
pieces); opensem/cli.py adds every registered stage's commands to `opensem`, a plugin's as well as the built-ins'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from opensem.errors import OpenSEMError
from opensem.terminal import Console

console = Console(stderr=True)  # progress and messages
out = Console()  # what the command answers
STATE = {"debug": False, "allow_outside": False}

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder (default: current directory)")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config value, e.g. --set train.learning_rate=1e-4 (repeatable)"),
]


def open_workspace(workspace: Path, sets: Optional[list[str]], lock: Optional[str] = None):
    """The workspace, its configs checked; ``lock``: this command writes, so it holds the workspace's lock."""
    from opensem.config import check_overrides
    from opensem.workspace import Workspace

    check_overrides(sets, Path(workspace).expanduser().resolve())
    ws = Workspace(workspace, tuple(sets or ()), allow_outside=STATE["allow_outside"])
    ws.check()
    if lock:
        ws.lock(lock)
    return ws


def choices(option: str, values: Optional[list[str]], allowed) -> Optional[list[str]]:
    """The values of a repeatable option, each one of ``allowed`` (a one-line error naming the first that is not)."""
    if not values:
        return None
    bad = [v for v in values if v not in allowed]
    if bad:
        raise OpenSEMError(f"{option} {bad[0]!r}: use one of {', '.join(allowed)}")
    return list(dict.fromkeys(values))
