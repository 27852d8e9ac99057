"""The Training Floor as a pipeline stage: train.jsonl -> models/adapters/{run_name}/ (the folder's layout and
lineage: opensem/adapters.py)."""

from __future__ import annotations

from pathlib import Path

from opensem.train import commands
from opensem.adapters import adapter_details, adapter_result, is_resumable
from opensem.lineage import file_sha256
from opensem.stages import STAGES, Context, ReportSection, StageResult
from opensem.workspace import Workspace


def data_paths(ws: Workspace, specs) -> list[Path]:
    return [ws.path(d.path) for d in specs]


def train_summary(m: dict) -> dict:
    """What the run manifest keeps of an instruction-tuning run's manifest."""
    data = m.get("data") or {}
    return {"data_train_sha256": (data.get("train") or {}).get("sha256"), "forge_manifest_sha256": data.get("forge_manifest_sha256"),
            "base_model": m.get("base_model"), "engine": m.get("engine"), "final_train_loss": m.get("final_train_loss"),
            "eval_loss": m.get("eval_loss"), "tokens_per_s": m.get("tokens_per_s"), "config_sha": m.get("config_sha"),
            "chain": m.get("chain")}


@STAGES.register
class TrainStage:
    """train.jsonl (every entry of ``datasets``) -> LoRA adapter. An interrupted run is resumed from its checkpoint."""

    name = "train"
    configs = ("train",)
    commands = {"train": commands.train}
    multi_node = True  # data-parallel across the nodes of a launch (torchrun); `opensem launch --nodes 2 --stages train`

    def outputs(self, ws: Workspace) -> list[str]:
        return [ws.train_config().output_dir]

    def columns(self, summary: dict) -> dict[str, str]:
        return {"adapter": Path(summary["adapter"]).name if summary.get("adapter") else "-"}

    def inputs(self, ctx: Context) -> dict:
        from opensem.models import resolve_base_model

        cfg = ctx.ws.train_config()
        base = resolve_base_model(cfg.base_model, ctx.ws.base_models_dir)
        hashes = lambda paths: [file_sha256(p) if p.exists() else None for p in paths]  # noqa: E731
        cpt = ctx.result("cpt")
        return {"train": hashes(data_paths(ctx.ws, cfg.datasets)), "test": hashes(data_paths(ctx.ws, cfg.test_datasets)),
                "config": cfg.model_dump(mode="json") | {"run_name": None}, "base": base.fingerprint,
                **({"start_from": cpt.summary.get("adapter_sha256")} if cpt else {})}

    def run(self, ctx: Context) -> StageResult:
        from opensem.train.recipe import default_run_name, run_training

        cfg = ctx.ws.train_config()
        chain = None
        cpt = ctx.result("cpt")  # continued pre-training ran before: start from it (after_cpt: merge | continue)
        if cpt:  # the same record `opensem train --from-cpt` keeps
            from opensem.cpt.stage import chain_from

            chain = chain_from(cpt.path(ctx.ws, "adapter").parent, cfg.after_cpt)
        interrupted = ctx.record.get("run_name")
        if interrupted and is_resumable(ctx.ws.output_path(cfg.output_dir, "train.output_dir") / interrupted):
            ctx.console.print(f"resuming interrupted training run {interrupted}")
            run_dir = run_training(ctx.ws, resume=True, run_name=interrupted, console=ctx.console)
        else:
            name = cfg.run_name or default_run_name(cfg)
            ctx.mark(run_name=name)
            run_dir = run_training(ctx.ws, run_name=name, console=ctx.console, chain=chain)
        return adapter_result(ctx.ws, run_dir, "train", train_summary)

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return adapter_details(ws, result)

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        m = result.summary
        num = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rows = [["engine", m.get("engine")], ["final train loss / eval loss", f"{num(m.get('final_train_loss'))} / {num(m.get('eval_loss'))}"],
                ["tokens/s", m.get("tokens_per_s")]]
        return [ReportSection("Training", rows, lineage={
            "adapter": m.get("adapter") and f"{m['adapter']} {m.get('adapter_sha256')}", "adapter manifest": m.get("manifest_sha256")})]
