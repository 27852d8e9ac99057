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
    report(ws, result) -> [ReportSection]   its part of the run's report.md and report.html: a table under a
                                  heading, and what it adds to the page's lineage (hashes of what it read and wrote)
    needs                         the stages whose results it uses (("train",)): taken from this run, else from the
                                  last time that stage finished in this workspace (`opensem run`, or its own command);
                                  a need never met is a one-line error before any stage does work
    commands                      its own CLI commands ({"forge": function}): typer functions, added to `opensem`

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
from opensem.lineage import file_sha256, now, read_json, write_json
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
class ReportSection:
    """A stage's part of the run's report: a heading, a table (``header`` and ``rows``; without a header, a
    key / value table), an optional line above it, and entries for the page's lineage table."""

    title: str
    rows: list[list[str]]
    header: list[str] = field(default_factory=list)
    note: str = ""
    lineage: dict[str, str] = field(default_factory=dict)

    @property
    def shown(self) -> bool:
        """Whether it has anything to show on the page (a section may only add lineage)."""
        return bool(self.title or self.rows or self.note)

    def markdown(self) -> str:
        if not self.shown:
            return ""
        cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        header, rows = (self.header, self.rows) if self.header else (["", ""], self.rows)
        lines = [f"## {self.title}", ""] + ([self.note, ""] if self.note else [])
        if rows:
            lines += ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
        return "\n".join(lines) + "\n"


@dataclass
class Context:
    """What a stage gets: the workspace, the results of the stages before it, and its own resume record."""

    ws: Workspace
    console: Console
    results: dict[str, StageResult]
    record: dict = field(default_factory=dict)  # what an unfinished attempt on the same inputs recorded
    mark: Callable[..., None] = lambda **values: None  # record progress, kept if the attempt is interrupted

    def result(self, name: str) -> Optional[StageResult]:
        """The result of a stage that ran before this one in this run, or of a declared need (``needs``)."""
        return self.results.get(name)

    def need(self, name: str) -> StageResult:
        """A result the stage cannot do without (declared in its ``needs``, so the pipeline has checked it is there)."""
        found = self.results.get(name)
        if found is None:
            raise ConfigError(f"configs/pipeline_config.yaml: key 'stages': this stage needs the result of {name!r}: "
                              f"put {name!r} before it, or declare it in the stage's `needs`")
        return found


class Stage(Protocol):
    name: str

    def inputs(self, ctx: Context) -> dict: ...

    def run(self, ctx: Context) -> StageResult: ...


# .opensem/pipeline_state.json: each stage's last attempt in `opensem run` (opensem.pipeline), and under "results" the
# last finished result of each stage, from a run or the stage's own command: where a need is found outside a run
STATE_FILE = "pipeline_state.json"


def remember(ws: Workspace, result: Optional[StageResult] = None, by: str = "", make: Optional[Callable[[], StageResult]] = None) -> None:
    """Record a stage's finished result (``result``, or ``make()`` for it), for the stages that need it later; a stage's
    own command calls this. In a data-parallel run only the main process records (the others write no outputs)."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    result = result if result is not None else make()
    path = ws.state_dir / STATE_FILE
    state = read_json(path, {}) or {}
    state.setdefault("results", {})[result.stage] = finished_record(result, by)
    write_json(path, state)


def finished_record(result: StageResult, by: str) -> dict:
    """How pipeline_state.json's "results" keeps a stage's last finished result, whoever finished it."""
    return result.to_json() | {"finished": now(), "by": by}


def recall(ws: Workspace, name: str) -> Optional[StageResult]:
    """The last finished result of stage ``name`` in this workspace, if its files are still as it left them."""
    rec = ((read_json(ws.state_dir / STATE_FILE, {}) or {}).get("results") or {}).get(name)
    if not rec:
        return None
    result = StageResult.from_json(rec)
    return result if result.unchanged(ws) else None


def needed_results(ws: Workspace, stages: list) -> dict[str, StageResult]:
    """What each stage ``needs`` and no stage before it in the list makes: the last finished result in the workspace.
    A need with none is a one-line error, before any stage does work."""
    found: dict[str, StageResult] = {}
    for i, stage in enumerate(stages):
        before = {s.name for s in stages[:i]}
        for need in getattr(stage, "needs", ()):
            if need in before or need in found:
                continue
            result = recall(ws, need)
            if result is None:
                raise ConfigError(f"configs/pipeline_config.yaml: key 'stages': {stage.name!r} needs the result of {need!r}, and "
                                  f"none has finished in this workspace (or its files changed since): put {need!r} before "
                                  f"{stage.name!r}, or run `opensem stage {need}` first")
            found[need] = result
    return found


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


def stage_report(stage: Stage, ws: Workspace, result: StageResult) -> list[ReportSection]:
    """A stage's report sections; none for a stage without ``report`` or one whose files are gone since."""
    if not hasattr(stage, "report"):
        return []
    try:
        return list(stage.report(ws, result) or [])
    except (OSError, KeyError, ValueError) as e:
        return [ReportSection(stage.name, [], note=f"its record could not be read ({e})")]


__all__ = ["STAGES", "STATE_FILE", "Artifact", "Context", "ReportSection", "Section", "Stage", "StageResult", "load_stage",
           "needed_results", "recall", "remember", "stage_configs", "stage_outputs", "stage_report"]
