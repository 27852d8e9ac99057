"""The stage contract: what every stage of `opensem run` is, and how results pass from one to the next.

A stage is one object with a ``name`` and two methods:

    inputs(ctx)  -> dict          what determines its outputs: content hashes and config (JSON-safe).
                                  Unchanged inputs and unchanged outputs: the stage is skipped.
    run(ctx)     -> StageResult   does the work; returns the artifacts it wrote (path + content hash)
                                  and a small JSON summary for the run manifest.

and, optionally, ``check(ws)``: raise a one-line error for a bad input before any stage of the run does
work (the judge checks the golden set and promptfoo before the forge pays for a teacher), and
``details(ws, result) -> dict``: the full record it wrote (its manifest or results file), for reports. Only the stage knows its folders, file names and manifest keys; the pipeline passes typed
results along (``ctx.results["train"]``) and never opens another stage's files.

The stages of a workspace are listed in configs/pipeline_config.yaml (``stages:``), by name from
``REGISTRY`` or as ``package.module:attribute`` for a stage of your own. See "Adding a stage" in the README.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol


from opensem.errors import ConfigError
from opensem.lineage import file_sha256
from opensem.terminal import Console
from opensem.workspace import Workspace

REGISTRY: dict[str, str] = {
    "forge": "opensem.forge.stage:ForgeStage",
    "baseline": "opensem.judge.stage:BaselineStage",
    "cpt": "opensem.cpt.stage:CptStage",
    "train": "opensem.train.stage:TrainStage",
    "fine-tuned": "opensem.judge.stage:FineTunedStage",
    "pairs": "opensem.prefs.stage:PairsStage",
    "preference": "opensem.prefs.stage:PreferenceStage",
    "preferred": "opensem.prefs.stage:PreferredStage",
    "export": "opensem.export.stage:ExportStage",
}


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
    """A stage by its registered name, or ``package.module:attribute`` (a class or an instance)."""
    target = REGISTRY.get(spec, spec)
    if ":" not in target:
        raise ConfigError(
            f"configs/pipeline_config.yaml: key 'stages': unknown stage {spec!r}: use one of {', '.join(REGISTRY)} "
            f"or package.module:attribute for a stage of your own"
        )
    module, _, attr = target.partition(":")
    try:
        obj: Any = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"configs/pipeline_config.yaml: key 'stages': cannot load {spec!r} ({e})") from None
    stage = obj() if isinstance(obj, type) else obj
    for needed in ("name", "inputs", "run"):
        if not hasattr(stage, needed):
            raise ConfigError(f"configs/pipeline_config.yaml: key 'stages': {spec!r} is not a stage (it has no {needed!r})")
    return stage
