"""Preference pairs and preference tuning as pipeline stages (after `train`), and where their outputs live.

    data/processed/preferences.jsonl, preferences_manifest.json     the pairs (stage `pairs`)
    models/preference/{run_name}/                                   the DPO/ORPO adapter (stage `preference`):
        adapter files, manifest.json (pairs hash, chain base -> sft -> dpo), run.json, training_log.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from opensem.prefs import commands
from opensem.adapters import adapter_details, adapter_hash, adapter_result, is_resumable
from opensem.lineage import file_sha256, read_json
from opensem.stages import STAGES, Artifact, Context, ReportSection, StageResult
from opensem.workspace import Workspace


def _sft_adapter(ctx: Context) -> Path:
    return ctx.need("train").path(ctx.ws, "adapter").parent


@STAGES.register
class PairsStage:
    """train.jsonl + the instruction-tuned adapter -> preferences.jsonl (its own wrong answers vs the grounded ones)."""

    name = "pairs"
    configs = ("preference", "train", "eval")
    commands = {"pairs": commands.pairs}
    needs = ("train",)

    def outputs(self, ws: Workspace) -> list[str]:
        return [str(Path(ws.preference_config().pairs.output).parent)]

    def inputs(self, ctx: Context) -> dict:
        tcfg = ctx.ws.train_config()
        ecfg = ctx.ws.eval_config()
        data = [file_sha256(ctx.ws.path(d.path)) if ctx.ws.path(d.path).exists() else None for d in tcfg.datasets]
        return {"adapter": adapter_hash(_sft_adapter(ctx)), "train": data, "config": ctx.ws.preference_config().pairs.model_dump(mode="json"),
                "judge": ecfg.judge.model_dump(mode="json"), "pass_threshold": ecfg.pass_threshold}

    def run(self, ctx: Context) -> StageResult:
        from opensem.prefs.pairs import build_pairs

        return pairs_result(ctx.ws, build_pairs(ctx.ws, _sft_adapter(ctx), ctx.console))

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return read_json(result.path(ws, "manifest"))

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        counts = result.summary.get("counts") or {}
        return [ReportSection("Preference pairs", [[k, v] for k, v in counts.items()], lineage={"preference pairs": result.summary.get("pairs_sha256")})]


def pairs_result(ws: Workspace, out: Path) -> StageResult:
    """The typed result of the pairs written to ``out``: the pairs file and its manifest."""
    from opensem.prefs.pairs import MANIFEST as PAIRS_MANIFEST

    m = read_json(out.parent / PAIRS_MANIFEST)
    arts = {"pairs": Artifact.of(ws, out), "manifest": Artifact.of(ws, out.parent / PAIRS_MANIFEST)}
    return StageResult("pairs", arts, {"pairs_sha256": arts["pairs"].sha256, "counts": m.get("counts"),
                                       "adapter_sha256": m.get("adapter_sha256"), "judge": m.get("judge")})


def preference_summary(m: dict) -> dict:
    return {"method": m.get("method"), "chain": m.get("chain"), "first_margin": m.get("first_margin"),
            "final_margin": m.get("final_margin")}


@STAGES.register
class PreferenceStage:
    """preferences.jsonl -> a DPO or ORPO adapter on top of the instruction-tuned model. Resumed when interrupted."""

    name = "preference"
    configs = ("preference", "train")
    commands = {"prefer": commands.prefer}
    needs = ("train",)  # the pairs: this run's pairs stage, else the configured file (your own pairs, or an earlier run's)

    def outputs(self, ws: Workspace) -> list[str]:
        return [ws.preference_config().output_dir]

    def columns(self, summary: dict) -> dict[str, str]:
        return {"preference": f"{summary.get('method')} {summary.get('run_name')}"}

    def inputs(self, ctx: Context) -> dict:
        from opensem.prefs.recipe import training_config

        pcfg = ctx.ws.preference_config()
        pairs = ctx.result("pairs")
        path = ctx.ws.path(pcfg.pairs.output)
        return {"pairs": pairs.summary["pairs_sha256"] if pairs else (file_sha256(path) if path.exists() else None),
                "adapter": adapter_hash(_sft_adapter(ctx)), "config": pcfg.model_dump(mode="json") | {"run_name": None},
                "training": training_config(ctx.ws, pcfg, run_name="x").model_dump(mode="json")}

    def run(self, ctx: Context) -> StageResult:
        from opensem.prefs.recipe import run_preference, training_config

        pcfg = ctx.ws.preference_config()
        interrupted: Optional[str] = ctx.record.get("run_name")
        if interrupted and is_resumable(ctx.ws.output_path(pcfg.output_dir, "preference.output_dir") / interrupted):
            run_dir = run_preference(ctx.ws, resume=True, run_name=interrupted, console=ctx.console)
        else:
            name = training_config(ctx.ws, pcfg).run_name
            ctx.mark(run_name=name)
            run_dir = run_preference(ctx.ws, _sft_adapter(ctx), run_name=name, console=ctx.console)
        return adapter_result(ctx.ws, run_dir, "preference", preference_summary)

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return adapter_details(ws, result)

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        m = result.summary
        return [ReportSection("Preference tuning", [["method", m.get("method")], ["reward margin, first -> last",
                                                                                   f"{m.get('first_margin')} -> {m.get('final_margin')}"]],
                              lineage={"preference adapter": f"{m.get('adapter')} {m.get('adapter_sha256')}"})]


@STAGES.register
class PreferredStage:
    """The judge of the preference-tuned model: base -> SFT -> SFT + preference, each step compared on the golden set.

    It answers and grades like the fine-tuned stage (its row is compared with the baseline), then pairs its
    scores with the instruction-tuned model's (the `fine-tuned` stage's results) for the step preference tuning
    took. The run's headline becomes baseline vs this final model."""

    name = "preferred"
    configs = ("eval", "preference", "train")
    needs = ("preference",)

    def outputs(self, ws: Workspace) -> list[str]:
        return [ws.eval_config().reports_dir]

    def columns(self, summary: dict) -> dict[str, str]:
        return {self.name: self._judge().columns(summary)["fine-tuned"]}

    def _judge(self):
        from opensem.judge.stage import FineTunedStage

        return FineTunedStage()

    def _adapter(self, ctx: Context) -> Path:
        return ctx.need("preference").path(ctx.ws, "adapter").parent

    def check(self, ws: Workspace) -> None:
        self._judge().check(ws)

    def inputs(self, ctx: Context) -> dict:
        ecfg = ctx.ws.eval_config()
        sft = ctx.result("fine-tuned")
        return {"golden": file_sha256(ctx.ws.path(ecfg.golden_set)), "eval": ecfg.model_dump(mode="json"),
                "adapter": adapter_hash(self._adapter(ctx)), "sft_results": sft.summary.get("results_sha256") if sft else None}

    def run(self, ctx: Context) -> StageResult:
        from opensem.judge import report
        from opensem.judge.stage import judge_result, run_judge

        res = run_judge(ctx.ws, "fine-tuned", adapter=str(self._adapter(ctx)), console=ctx.console)
        result = judge_result(ctx.ws, self.name, res)
        sft = ctx.result("fine-tuned")
        if sft is not None:
            ecfg = ctx.ws.eval_config()
            sft_items = self._judge().details(ctx.ws, sft)["items"]
            step = report.compare(sft_items, res["items"], ecfg.pass_threshold, ecfg.bootstrap_samples, ecfg.seed)
            result.summary["steps"] = {
                "sft_vs_baseline": sft.summary.get("comparison"),
                "preference_vs_sft": {k: v for k, v in step.items() if k != "regressions"} | {"regressions": len(step["regressions"])},
                "final_vs_baseline": result.summary.get("comparison"),
            }
            report.render_steps(ctx.console, result.summary["steps"])
        return result

    def details(self, ws: Workspace, result: StageResult) -> dict:
        return read_json(result.path(ws, "results"))

    def report(self, ws: Workspace, result: StageResult) -> list[ReportSection]:
        """Each step of the chain base -> SFT -> SFT + preference, paired on the same golden questions."""
        from opensem.judge import report

        own = self._judge().report(ws, result)
        steps = result.summary.get("steps")
        if not steps:
            return own
        f = lambda x, fmt=".2f": "-" if x is None else format(x, fmt)  # noqa: E731
        rows = [[f"{b} vs {a}", f(c["mean_diff"], "+.2f"), f"[{f(c['mean_diff_ci'][0])}, {f(c['mean_diff_ci'][1])}]",
                 f"{c['wins']} / {c['ties']} / {c['losses']}", c["regressions"]]
                for key, (b, a) in report.STEP_NAMES.items() for c in [steps.get(key)] if c]
        return own + [ReportSection("Each step of the chain", rows, ["step", "mean score difference", "95% CI", "win / tie / loss",
                                                                     "regressions"],
                                    note=f"Final model (SFT + preference): {result.summary.get('headline') or ''}")]
