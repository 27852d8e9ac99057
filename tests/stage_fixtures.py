"""Two tiny stages of the kind a user or maintainer writes: each one module-level class, nothing else edited."""

from __future__ import annotations

from opensem.lineage import file_sha256
from opensem.stages import Artifact, Context, StageResult

CALLS: list[str] = []


class CountWords:
    name = "count-words"

    def inputs(self, ctx: Context) -> dict:
        return {"doc": file_sha256(ctx.ws.path("data/raw/notes.txt"))}

    def run(self, ctx: Context) -> StageResult:
        CALLS.append(self.name)
        words = len(ctx.ws.path("data/raw/notes.txt").read_text().split())
        out = ctx.ws.output_path("out", "count-words output") / "count.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(str(words))
        return StageResult(self.name, {"count": Artifact.of(ctx.ws, out)}, {"words": words})


class Shout:
    name = "shout"

    def inputs(self, ctx: Context) -> dict:
        return {"count": ctx.result("count-words").artifacts["count"].sha256}

    def run(self, ctx: Context) -> StageResult:
        CALLS.append(self.name)
        words = ctx.result("count-words").path(ctx.ws, "count").read_text()
        out = ctx.ws.output_path("out", "shout output") / "SHOUT.txt"
        out.write_text(f"{words} WORDS")
        return StageResult(self.name, {"shout": Artifact.of(ctx.ws, out)})
