"""Continued pre-training as a pipeline stage, and the one place that knows a CPT run's folder.

    models/cpt/{run_name}/
        adapter_model.safetensors, adapter_config.json, tokenizer files    the CPT adapter
        manifest.json        corpus (hash, records by kind, rewrite cost), perplexity before/after, base model
        run.json, training_log.jsonl, checkpoints/                          as for a training run
        merged/              base + CPT adapter as one model (train/stage.py: merged_model), written when instruction tuning starts from it
                             with ``after_cpt: merge`` (the default)

Put ``cpt`` before ``train`` in configs/pipeline_config.yaml's stages: the train stage then starts from this
result, and its manifest (and the judge's report) names the chain base -> cpt -> sft.
"""

from __future__ import annotations

import json
from pathlib import Path

from opensem.errors import OpenSEMError
from opensem.lineage import file_sha256, read_json
from opensem.stages import Artifact, Context, StageResult
from opensem.train.stage import ADAPTER_WEIGHTS, MANIFEST, is_resumable, merged_model
from opensem.workspace import Workspace


def cpt_result(ws: Workspace, run_dir: Path) -> StageResult:
    m = read_json(run_dir / MANIFEST)
    weights, manifest = Artifact.of(ws, run_dir / ADAPTER_WEIGHTS), Artifact.of(ws, run_dir / MANIFEST)
    corpus = m.get("corpus") or {}
    return StageResult("cpt", {"adapter": weights, "manifest": manifest}, {
        "adapter": str(Path(weights.path).parent),
        "adapter_sha256": weights.sha256,
        "run_name": m.get("run_name"),
        "manifest_sha256": manifest.sha256,
        "corpus_sha256": corpus.get("sha256"),
        "corpus_records": corpus.get("records"),
        "base_model": m.get("base_model"),
        "perplexity_before": m.get("perplexity_before"),
        "perplexity_after": m.get("perplexity_after"),
        "tokens_per_s": m.get("tokens_per_s"),
    })


def find_cpt(ws: Workspace, name: str | None = None) -> Path:
    """A finished CPT run by name, or the latest one."""
    root = ws.path(ws.cpt_config().output_dir)
    done = [d for d in root.glob("*/") if (d / MANIFEST).exists() and (d / ADAPTER_WEIGHTS).exists()]
    if name:
        done = [d for d in done if d.name == name]
    if not done:
        raise OpenSEMError(f"no finished continued pre-training run{f' named {name!r}' if name else ''} in "
                           f"{ws.cpt_config().output_dir}/: run `opensem cpt` first")
    return max(done, key=lambda d: (read_json(d / MANIFEST, {}).get("created", ""), d.stat().st_mtime)).resolve()


def chain_from(cpt_dir: Path, mode: str):
    """How instruction tuning starts from a CPT run: a fresh LoRA on the merged model, or the CPT adapter trained on."""
    from opensem.train.recipe import Chain

    m = read_json(cpt_dir / MANIFEST)
    record = {"stage": "cpt", "mode": mode, "run_name": m.get("run_name"), "adapter": str(cpt_dir),
              "adapter_sha256": file_sha256(cpt_dir / ADAPTER_WEIGHTS), "manifest_sha256": file_sha256(cpt_dir / MANIFEST),
              "base_model": m.get("base_model"), "perplexity_before": m.get("perplexity_before"),
              "perplexity_after": m.get("perplexity_after")}
    if mode == "merge":
        return Chain({"base_model": str(merged_model(cpt_dir))}, record)
    return Chain({"lora_model_dir": str(cpt_dir)}, record)


class CptStage:
    """data/raw (and teacher rewrites) -> CPT adapter in models/cpt/{run_name}. An interrupted run is resumed."""

    name = "cpt"

    def inputs(self, ctx: Context) -> dict:
        from opensem.cpt.recipe import training_config
        from opensem.forge.stage import raw_inputs
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
        return cpt_result(ctx.ws, run_dir)

    def details(self, ws: Workspace, result: StageResult) -> dict:
        log = result.path(ws, "adapter").parent / "training_log.jsonl"
        rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()] if log.exists() else []
        return {"manifest": read_json(result.path(ws, "manifest")), "log": rows}
