"""Files that cross the machine's edge: what a launch uploads and what `launch fetch` brings home.

Both copy regular files only. Going up, hidden entries inside a synced folder stay home (a ``.git`` or ``.env``
under data/raw), and a link is followed only when it leads to a regular file inside the workspace. Coming
home, links, ``..`` names and anything that is not a regular file or a folder are refused, and nothing is
written through a link already at the destination: every file lands under the destination folder.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


IGNORED = {"__pycache__", ".ipynb_checkpoints"}


def upload_tree(src: Path, dst: Path, workspace: Path) -> list[tuple[str, str]]:
    """Copy ``src`` (a file or a folder of the workspace) to ``dst``; returns what stayed home: (path, reason)."""
    root = workspace.resolve()
    left: list[tuple[str, str]] = []

    def one(path: Path, target: Path) -> None:
        rel = os.path.relpath(path, workspace)
        if path.is_symlink():
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):
                left.append((rel, "broken link or a link loop"))
                return
            if not real.is_relative_to(root):
                left.append((rel, "link to a path outside the workspace: not uploaded"))
                return
            if not real.is_file():
                left.append((rel, "link to a folder: not followed"))
                return
            path = real
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            left.append((rel, "not a regular file: not uploaded"))
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target)

    if not src.is_dir() or src.is_symlink():
        one(src, dst)
        return left
    for top, dirs, names in os.walk(src, followlinks=False):
        top_path = Path(top)
        out = dst / top_path.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        keep = []
        for d in sorted(dirs):
            p = top_path / d
            if d in IGNORED:
                continue
            if d.startswith("."):
                left.append((os.path.relpath(p, workspace) + "/", "hidden folder: not uploaded"))
            elif p.is_symlink():
                left.append((os.path.relpath(p, workspace), "link to a folder: not followed"))
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            if name.endswith(".pyc"):
                continue
            if name.startswith("."):
                left.append((os.path.relpath(top_path / name, workspace), "hidden file: not uploaded"))
                continue
            one(top_path / name, out / name)
    return left


def bring_home(src: Path, dst: Path, workspace: Path) -> list[str]:
    """Copy the tree (or file) ``src`` that came from a remote machine to ``dst`` under ``workspace``: regular
    files and folders only. Returns what was refused: links, odd names, special files, a path that a link
    already in the workspace would send elsewhere."""
    refused: list[str] = []
    root = workspace.resolve()

    def place(path: Path, target: Path) -> None:
        if not target.parent.resolve(strict=False).is_relative_to(root) or target.parent.is_symlink():
            refused.append(f"{target}: a link in the workspace would send it elsewhere")
            return
        if target.is_symlink() or (target.exists() and not target.is_file()):
            if target.is_dir() and not target.is_symlink():
                refused.append(f"{target}: a folder is in the way")
                return
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.fetching")
        shutil.copyfile(path, tmp, follow_symlinks=False)
        os.replace(tmp, target)

    def check(path: Path) -> bool:
        name = path.name
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
            refused.append(f"{path}: a name that could leave the folder")
            return False
        if path.is_symlink():
            refused.append(f"{path.name}: a link (refused)")
            return False
        return True

    if not check(src):
        return refused
    if src.is_file():
        place(src, dst)
        return refused
    for top, dirs, names in os.walk(src, followlinks=False):
        top_path = Path(top)
        out = dst / top_path.relative_to(src)
        dirs[:] = [d for d in sorted(dirs) if check(top_path / d)]
        for name in sorted(names):
            p = top_path / name
            if not check(p):
                continue
            if not stat.S_ISREG(p.lstat().st_mode):
                refused.append(f"{p.name}: not a regular file")
                continue
            place(p, out / name)
    return refused


def link_or_copy(src, dst) -> None:
    """A hard link where the file system allows it (no bytes copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
