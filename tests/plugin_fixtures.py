"""Extensions of one's own, outside src/: a judge scorer, a pipeline stage with a config section, a command and a
report section of its own, a stage that needs it, and an export format.
Registered by name through entry points (a dist-info folder put on PYTHONPATH by the test), or named in a config
as ``plugin_fixtures:Attribute``. Nothing in src/ lists them."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pydantic import Field

from opensem.commands import SetOpt, WorkspaceOpt, open_workspace, out
from opensem.config import Section, Strict
from opensem.judge.scorers import Verdict
from opensem.lineage import json_sha256, read_json, write_json
from opensem.stages import Artifact, Context, ReportSection, StageResult
from opensem.text import normalize


class ExactScorer:
    """5 when the candidate holds the golden answer's words in order, 1 otherwise."""

    name = "exact-match scorer (test plugin)"
    short = "exact-match"

    def score_many(self, items):
        return [Verdict(5.0 if normalize(gold) in normalize(cand) else 1.0, "exact match" if normalize(gold) in normalize(cand)
                        else "no exact match") for _, gold, cand in items]


class HelloConfig(Strict):
    greeting: str = Field("hello", description="What the stage writes")
    times: int = Field(1, ge=1, le=10)


def say_hello(workspace: WorkspaceOpt = Path("."), sets: SetOpt = None):
    """Print the configured greeting (the hello stage's own command)."""
    out.print(open_workspace(workspace, sets).config("hello").greeting)


class HelloStage:
    """Writes its greeting (configs/hello_config.yaml) to data/hello.txt, as many times as it is told."""

    name = "hello"
    config_section = Section("hello", "configs/hello_config.yaml", HelloConfig)
    commands = {"hello": say_hello}

    def report(self, ws, result: StageResult) -> list[ReportSection]:
        return [ReportSection("Hello", [["greeting", result.summary["greeting"]], ["times", result.summary["times"]]],
                              lineage={"hello.txt": result.artifacts["greeting"].sha256})]

    def outputs(self, ws) -> list[str]:
        return ["data/hello.txt"]

    def columns(self, summary: dict) -> dict[str, str]:
        return {"greeting": f"{summary['greeting']} x{summary['times']}"}

    def inputs(self, ctx: Context) -> dict:
        return {"config": ctx.ws.config("hello").model_dump()}

    def run(self, ctx: Context) -> StageResult:
        cfg = ctx.ws.config("hello")
        out = ctx.ws.path("data/hello.txt")
        out.write_text(" ".join([cfg.greeting] * cfg.times) + "\n", encoding="utf-8")
        count = read_json(ctx.ws.path("data/hello_runs.json"), {"runs": 0})["runs"] + 1
        write_json(ctx.ws.path("data/hello_runs.json"), {"runs": count})
        return StageResult(self.name, {"greeting": Artifact.of(ctx.ws, out)},
                           {"greeting": cfg.greeting, "times": cfg.times, "config_sha": json_sha256(cfg.model_dump())})


class EchoStage:
    """Shouts what the hello stage wrote (this run's, or the last one finished here) into data/echo.txt."""

    name = "echo"
    needs = ("hello",)

    def inputs(self, ctx: Context) -> dict:
        return {"hello": ctx.need("hello").artifacts["greeting"].sha256}

    def run(self, ctx: Context) -> StageResult:
        out = ctx.ws.path("data/echo.txt")
        out.write_text(ctx.need("hello").path(ctx.ws, "greeting").read_text(encoding="utf-8").upper(), encoding="utf-8")
        return StageResult(self.name, {"echo": Artifact.of(ctx.ws, out)})


class AdapterCopy:
    """The adapter alone, copied into the export folder, checked by answering with the base model and the copy."""

    name = "adapter-copy"

    def space(self, job) -> dict[str, int]:
        return {"adapter copy": sum(p.stat().st_size for p in job.adapter_dir.iterdir() if p.is_file())}

    def write(self, job) -> None:
        from opensem.inference import ChatModel

        t = time.time()
        target = job.out / "adapter"
        target.mkdir(exist_ok=True)
        for f in job.adapter_dir.iterdir():  # weights, adapter config, tokenizer and chat template
            if f.is_file():
                shutil.copy2(f, target / f.name)
        c = None
        if job.do_verify:
            model = ChatModel(str(job.base_path), str(target))
            answers = [x.text for x in model.generate(job.convs, max_new_tokens=job.cfg.verify.max_new_tokens)]
            c = job.check("adapter copy (transformers)", answers, False)
        job.finish(self.name, job.entry(target / "adapter_model.safetensors", self.name, None, time.time() - t, c))

