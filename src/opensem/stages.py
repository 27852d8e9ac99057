"""The stage contract: what every stage of `opensem run` is, and how results pass from one to the next.

A stage is one object with a ``name`` and two methods:

    inputs(ctx)  -> dict          what determines its outputs: content hashes and config (JSON-safe).
                                  Unchanged inputs and unchanged outputs: the stage is skipped.
    run(ctx)     -> StageResult   does the work; returns the artifacts it wrote (path + content hash)
                                  and a small JSON summary for the run manifest.

and, optionally:

    configs                       the config sections it reads (("train", "eval")): every one is loaded and
                                  checked before the first stage of a run does any work
    config_section                a section of its own: ``Section("hello", "configs/hello_config.yaml", Schema)``;
                                  then ``ctx.ws.config("hello")`` and ``--set hello.key=value`` work as for any other
    outputs(ws) -> [paths]        the workspace folders it writes (relative): what a run on a rented GPU brings home
    columns(summary) -> dict      its cells in `opensem runs` (column -> text), from the summary it returned
    check(ws)                     a one-line error for a bad input before any stage of the run does work (the judge
                                  checks the golden set and promptfoo before the forge pays for a teacher)
    details(ws, result) -> dict   the full record it wrote (its manifest or results file), for reports

Only the stage knows its folders, file names and manifest keys; the pipeline passes typed results along
(``ctx.results["train"]``) and never opens another stage's files.

Stages register by name in ``STAGES`` (opensem/plugins.py): the built-ins with ``@STAGES.register`` in their own
module, a package of yours through an ``opensem.stages`` entry point. configs/pipeline_config.yaml lists a
workspace's stages (``stages:``) by name, or as ``package.module:attribute``. See "Adding a stage" in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol


from opensem.config import Section, register_section
from opensem.errors import ConfigError
from opensem.lineage import file_sha256
from opensem.plugins import Registry
from opensem.terminal import Console
from opensem.workspace import Workspace

STAGES = Registry("stage", "opensem.stages", ("opensem.forge.stage", "opensem.judge.stage", "opensem.cpt.stage",
                                              "opensem.train.stage", "opensem.prefs.stage", "opensem.export.stage"),
                  lambda obj: all(hasattr(obj, a) for a in ("name", "inputs", "run")))


@dataclass(frozen=True)
class Artifact:
    """A file a stage wrote: where (relative to the workspace when inside it) and its content hash."""

    path: str
    sha256: str

    @classmethod
    def of(cls, ws: Workspace, path: Path) -> "Artifact":
        path = Path(path).resolve()
        rel = str(path.relative_to(ws.root)) if path.is_relative_to(ws.root) else str(path)
        return cls(rel, file_sha256(path))

    def resolve(self, ws: Workspace) -> Path:
        return ws.path(self.path)

    def unchanged(self, ws: Workspace) -> bool:
        p = self.resolve(ws)
        return p.is_file() and file_sha256(p) == self.sha256


@dataclass
class StageResult:
    """What a stage hands on: its artifacts by name, and a JSON summary (counts, headline numbers, lineage)."""

    stage: str
    artifacts: dict[str, Artifact]
    summary: dict = field(default_factory=dict)

    def path(self, ws: Workspace, name: str) -> Path:
        return self.artifacts[name].resolve(ws)

    def unchanged(self, ws: Workspace) -> bool:
        return all(a.unchanged(ws) for a in self.artifacts.values())

    def to_json(self) -> dict:
        return {"stage": self.stage, "artifacts": {k: vars(a) for k, a in self.artifacts.items()}, "summary": self.summary}

    @classmethod
    def from_json(cls, data: dict) -> "StageResult":
        return cls(data["stage"], {k: Artifact(**a) for k, a in data["artifacts"].items()}, data.get("summary", {}))


@dataclass
class Context:
    """What a stage gets: the workspace, the results of the stages before it, and its own resume record."""

    ws: Workspace
    console: Console
    results: dict[str, StageResult]
    record: dict = field(default_factory=dict)  # what an unfinished attempt on the same inputs recorded
    mark: Callable[..., None] = lambda **values: None  # record progress, kept if the attempt is interrupted

    def result(self, name: str) -> Optional[StageResult]:
        return self.results.get(name)


class Stage(Protocol):
    name: str

    def inputs(self, ctx: Context) -> dict: ...

    def run(self, ctx: Context) -> StageResult: ...


def load_stage(spec: str) -> Stage:
    """A stage by its registered name, or ``package.module:attribute`` (a class or an instance). A stage with a
    config section of its own registers it, so its file and ``--set`` keys are known from here on."""
    try:
        obj: Any = STAGES.get(spec)
    except ValueError as e:
        raise ConfigError(f"configs/pipeline_config.yaml: key 'stages': {e}") from None
    stage = obj() if isinstance(obj, type) else obj
    for needed in ("name", "inputs", "run"):
        if not hasattr(stage, needed):
            raise ConfigError(f"configs/pipeline_config.yaml: key 'stages': {spec!r} is not a stage (it has no {needed!r})")
    own = getattr(stage, "config_section", None)
    if own is not None:
        register_section(own)
    return stage


def stage_configs(stage: Stage) -> list[str]:
    """The config sections a stage reads: those it declares, and its own."""
    own = getattr(stage, "config_section", None)
    return list(getattr(stage, "configs", ())) + ([own.name] if own is not None else [])


def stage_outputs(stage: Stage, ws: Workspace) -> list[str]:
    """The folders a stage writes, relative to the workspace (those it configures outside are left out)."""
    out = []
    for p in getattr(stage, "outputs", lambda ws: [])(ws):
        path = ws.path(p).resolve()
        if path.is_relative_to(ws.root) and path != ws.root:
            out.append(str(path.relative_to(ws.root)))
    return out


__all__ = ["STAGES", "Artifact", "Context", "Section", "Stage", "StageResult", "load_stage", "stage_configs", "stage_outputs"]
