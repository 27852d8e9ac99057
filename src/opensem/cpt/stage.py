"""Continued pre-training as a pipeline stage, and the one place that knows a CPT run's folder.

    models/cpt/{run_name}/
        adapter_model.safetensors, adapter_config.json, tokenizer files    the CPT adapter
        manifest.json        corpus (hash, records by kind, rewrite cost), perplexity before/after, base model
        run.json, training_log.jsonl, checkpoints/                          as for a training run
        merged/              base + CPT adapter as one model (opensem/adapters.py: merged_model), written when instruction tuning starts from it
                             with ``after_cpt: merge`` (the default)

Put ``cpt`` before ``train`` in configs/pipeline_config.yaml's stages: the train stage then starts from this
result, and its manifest (and the judge's report) names the chain base -> cpt -> sft.
"""

from __future__ import annotations

from pathlib import Path

from opensem.cpt import commands
from opensem.adapters import MANIFEST, Chain, adapter_details, adapter_result, find_finished, is_resumable
from opensem.lineage import read_json
from opensem.stages import STAGES, Context, ReportSection, StageResult
from opensem.workspace import Workspace


def cpt_summary(m: dict) -> dict:
    corpus = m.get("corpus") or {}
    return {"corpus_sha256": corpus.get("sha256"), "corpus_records": corpus.get("records"), "base_model": m.get("base_model"),
            "perplexity_before": m.get("perplexity_before"), "perplexity_after": m.get("perplexity_after"),
            "tokens_per_s": m.get("tokens_per_s")}


def find_cpt(ws: Workspace, name: str | None = None) -> Path:
    """A finished CPT run by name, or the latest one."""
    out = ws.cpt_config().output_dir
    return find_finished(ws.path(out), name, "continued pre-training run", "opensem cpt", shown=out)


def chain_from(cpt_dir: Path, mode: str) -> Chain:
    """How instruction tuning starts from a CPT run: a fresh LoRA on the merged model, or the CPT adapter trained on."""
    m = read_json(cpt_dir / MANIFEST)
    return Chain.from_run(cpt_dir, mode, perplexity_before=m.get("perplexity_before"), perplexity_after=m.get("perplexity_after"))


@STAGES.register
class CptStage:
    """data/raw (and teacher rewrites) -> CPT adapter in models/cpt/{run_name}. An interrupted run is resumed."""

    name = "cpt"
    configs = ("cpt", "forge", "train")
    commands = {"cpt": commands.cpt}

    def outputs(self, ws: Workspace) -> list[str]:
        ccfg = ws.cpt_config()
        return [ccfg.output_dir, str(Path(ccfg.corpus).parent)]

    def columns(self, summary: dict) -> dict[str, str]:
        before, after = summary.get("perplexity_before"), summary.get("perplexity_after")
        return {"cpt perplexity": "-" if before is None or after is None else f"{before:.1f} -> {after:.1f}"}

    def inputs(self, ctx: Context) -> dict:
        from opensem.cpt.recipe import training_config
        from opensem.forge.documents import raw_inputs
        from opensem.models import resolve_base_model

        ccfg, fcfg = ctx.ws.cpt_config(), ctx.ws.forge_config()
        tcfg = training_config(ctx.ws, ccfg, run_name="x")
        teacher = {"teacher": fcfg.teacher.model_dump(mode="json"), "cost": fcfg.cost.model_dump(mode="json")} \
            if ccfg.augment.enabled else None
        return {"raw": raw_inputs(ctx.ws, fcfg), "input_dir": fcfg.input_dir, "chunking": fcfg.chunking.model_dump(mode="json"),
                "config": ccfg.model_dump(mode="json") | {"run_name": None}, "training": tcfg.model_dump(mode="json") | {"run_name": None},
                "teacher": teacher, "base": resolve_base_model(tcfg.base_model, ctx.ws.base_models_dir).fingerprint}

    def run(self, ctx: Context) -> StageResult:
        from opensem.cpt.recipe import run_cpt, training_config

        ccfg = ctx.ws.cpt_config()
        interrupted = ctx.record.get("run_name")
        if interrupted and is_resumable(ctx.ws.output_path(ccfg.output_dir, "cpt.output_dir") / interrupted):
            ctx.console.print(f"resuming interrupted continued pre-training run {interrupted}")
            run_dir = run_cpt(ctx.ws, resume=True, run_name=interrupted, console=ctx.console)
        else:
            name = training_config(ctx.ws, ccfg).run_name
            ctx.mark(run_name=name)
            run_dir = run_cpt(ctx.ws, run_name=name, console=ctx.console)
        return adapter_result(ctx.ws, run_dir, "cpt", cpt_summary)

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return adapter_details(ws, result)

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        c = result.summary
        perplexity = f"{c.get('perplexity_before')} -> {c.get('perplexity_after')}"
        return [ReportSection("Continued pre-training", [["perplexity on the documents", perplexity],
                                                         ["corpus records", c.get("corpus_records")], ["tokens/s", c.get("tokens_per_s")]],
                              lineage={"cpt corpus": c.get("corpus_sha256"), "cpt adapter": f"{c.get('adapter')} {c.get('adapter_sha256')}",
                                       "cpt perplexity": perplexity})]
