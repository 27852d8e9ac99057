"""A workspace: the folder layout of the requirements, wherever the user keeps it.

    configs/{forge,train,eval,cpt,preference,pipeline}_config.yaml
    data/raw/            your documents (.txt, .md, .pdf)
    data/processed/      train.jsonl, test.jsonl, forge manifest   (generated)
    evals/golden_set.json
    evals/reports/       judge results                              (generated)
    models/base/         materialised base models                   (generated)
    models/adapters/     one folder per training run                 (generated)
    models/cpt/          one folder per continued pre-training run   (generated)
    models/preference/   one folder per preference-tuning run (DPO/ORPO) (generated)
    .opensem/            caches and run records                      (generated)
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from typing import TYPE_CHECKING

from opensem.config import PipelineConfig, load_section
from opensem.errors import ConfigError, OpenSEMError

if TYPE_CHECKING:  # each schema lives next to its stage (config.py: SECTIONS), loaded with the section
    from opensem.cpt.config import CptConfig
    from opensem.export.config import ExportConfig
    from opensem.forge.config import ForgeConfig
    from opensem.judge.config import EvalConfig
    from opensem.kernel.config import TrainConfig
    from opensem.launch.config import LaunchConfig
    from opensem.prefs.config import PreferenceConfig

LAYOUT_DIRS = ["configs", "data/raw", "data/processed", "evals", "models/base", "models/adapters"]
GITIGNORE = """\
data/processed/*
models/base/*
models/adapters/*
evals/reports/
.opensem/
wandb/
"""


_HELD: dict = {}  # workspace root -> the open lock file of this process


@dataclass
class Workspace:
    root: Path
    overrides: tuple[str, ...] = ()
    allow_outside: bool = False  # --allow-outside-workspace: outputs may be written outside the root

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()

    # --- paths -------------------------------------------------------------------------------------
    def path(self, rel: str | Path) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.root / p

    def output_path(self, rel: str | Path, key: str) -> Path:
        """Where a stage writes: inside the workspace (symlinks and '..' resolved), unless allowed."""
        p = self.path(rel).resolve()
        if not (p == self.root or p.is_relative_to(self.root)) and not self.allow_outside:
            raise ConfigError(
                f"{key} {str(rel)!r} resolves to {p}, outside the workspace {self.root}: use a folder inside it, "
                f"or pass --allow-outside-workspace to write there"
            )
        return p

    @property
    def state_dir(self) -> Path:
        return self.root / ".opensem"

    def lock(self, command: str) -> None:
        """Hold the workspace for this process: a second command that writes here exits with who holds it. An
        advisory lock on .opensem/lock (released by the system when the holder ends, however it ends: a stale
        lock cannot outlive its process), with the holder's pid, command and start time written inside."""
        import errno
        import fcntl
        import json
        import os
        import socket
        import time

        if _HELD.get(self.root) is not None or os.environ.get("RANK", "0") != "0":
            return  # held already, or another rank of a torchrun job whose rank 0 holds it

        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):  # a filesystem without locks (a bucket mount):
                _HELD[self.root] = fd  # one job writes there; run unlocked rather than not at all
                return
            os.close(fd)
            try:
                holder = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                holder = {}
            who = (f"pid {holder.get('pid')} (`opensem {holder.get('command')}`, since {holder.get('started')})"
                   if holder.get("pid") else "another opensem process")
            raise OpenSEMError(f"{self.root}: the workspace is in use by {who}: wait for it to finish, or stop it, "
                               f"then run this again") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        _HELD[self.root] = fd  # held until the process ends

    @property
    def base_models_dir(self) -> Path:
        return self.root / "models" / "base"

    # --- configs -----------------------------------------------------------------------------------
    def config(self, section: str):
        """Any config section by name (config.py: SECTIONS, and stages' own), with this workspace's --set values."""
        return load_section(section, self.root, list(self.overrides))

    def forge_config(self) -> ForgeConfig:
        return load_section("forge", self.root, list(self.overrides))

    def train_config(self) -> TrainConfig:
        return load_section("train", self.root, list(self.overrides))

    def eval_config(self) -> EvalConfig:
        return load_section("eval", self.root, list(self.overrides))

    def cpt_config(self) -> CptConfig:
        return load_section("cpt", self.root, list(self.overrides))

    def preference_config(self) -> PreferenceConfig:
        return load_section("preference", self.root, list(self.overrides))

    def export_config(self) -> ExportConfig:
        return load_section("export", self.root, list(self.overrides))

    def launch_config(self) -> LaunchConfig:
        return load_section("launch", self.root, list(self.overrides))

    def pipeline_config(self) -> PipelineConfig:
        return load_section("pipeline", self.root, list(self.overrides))

    def check(self) -> None:
        if not self.root.is_dir():
            raise OpenSEMError(f"workspace {self.root} does not exist: create it with `opensem init {self.root}`")


def template_dir() -> Path:
    return Path(str(resources.files("opensem") / "assets" / "workspace"))


def examples_root() -> Path:
    """The examples shipped with the repository (examples/ beside src/), or inside the package."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "examples", Path(str(resources.files("opensem") / "assets" / "examples"))):
        if cand.is_dir():
            return cand
    raise OpenSEMError("the example domains are not installed with this copy of opensem")


EXAMPLE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # always fullmatch: "$" lets a trailing newline through


def plain_name(value, what: str, source: str) -> str:
    """The one rule for a name read from a file or a flag that becomes a folder or file name (run names, aliases):
    letters, digits, '.', '_', '-', no '..'; anything else is a one-line error naming where it came from."""
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value) or ".." in value:
        raise OpenSEMError(f"{source}: {what} {str(value)[:80]!r} is not a plain name (letters, digits, '.', '_', '-'; "
                           f"no '/' or '..'): fix it, or take the files from a source you trust")
    return value


def child_path(parent: Path, name: str, what: str, source: str) -> Path:
    """``parent / name`` for a plain ``name``, checked to resolve inside ``parent`` (a link out is refused too)."""
    path = Path(parent) / plain_name(name, what, source)
    if not path.resolve().is_relative_to(Path(parent).resolve()):
        raise OpenSEMError(f"{source}: {what} {name!r} leads outside {parent}: remove the link there")
    return path


def example_names() -> list[str]:
    """The shipped examples: folders under examples_root() with a plain name."""
    return sorted(p.name for p in examples_root().iterdir() if p.is_dir() and not p.is_symlink() and EXAMPLE_NAME.fullmatch(p.name))


def example_dir(name: str) -> Path:
    """An example by its name only (never a path: '/etc', '..', 'x/../..' are refused)."""
    names = example_names()
    if name not in names:
        raise OpenSEMError(f"--example {name!r}: no such example; use one of {', '.join(names)}")
    return examples_root() / name


def init_workspace(dest: Path, example: str | None = None, force: bool = False) -> list[Path]:
    """Create the layout in ``dest``; never overwrite a user's file unless ``force``."""
    dest = Path(dest).expanduser().resolve()
    ex = example_dir(example) if example else None  # a name from the list, before anything is written
    created: list[Path] = []
    for d in LAYOUT_DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    src = template_dir()
    copies: list[tuple[Path, Path]] = [(f, dest / f.relative_to(src)) for f in src.rglob("*") if f.is_file()]
    if ex:
        # the example's files win over the template's; regular files inside the example only
        copies = [c for c in copies if not (ex / c[0].relative_to(src)).exists()]
        copies += [(f, dest / f.relative_to(ex)) for f in ex.rglob("*") if f.is_file() and not f.is_symlink()
                   and f.name != "README.md" and f.resolve().is_relative_to(ex.resolve())]
    templates = {f.relative_to(src): f.read_bytes() for f in src.rglob("*") if f.is_file()}
    for s, d in copies:
        # a file still equal to the template is not the user's: an example may replace it
        if d.exists() and d.read_bytes() == s.read_bytes():
            continue
        untouched = d.exists() and templates.get(d.relative_to(dest)) == d.read_bytes()
        if d.exists() and not force and not untouched:
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)
        created.append(d)
    gi = dest / ".gitignore"
    if not gi.exists():
        gi.write_text(GITIGNORE)
        created.append(gi)
    return created
