"""`opensem run`: forge -> baseline -> train -> fine-tuned -> report, with lineage.

Each stage is skipped when the content hashes of its inputs match its last success (``--force`` redoes
all). A run interrupted in training resumes from its checkpoint; the forge resumes through its reply
cache. Every run writes ``runs/{run_id}/`` with run_manifest.json (forge manifest, adapter manifest and
both judge results, tied together by content hash), report.html and report.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

from opensem.errors import OpenSEMError, StageInterrupted
from opensem.lineage import file_sha256, json_sha256, now, read_json, versions, write_json
from opensem.workspace import Workspace

STATE_FILE = "pipeline_state.json"
UNFINISHED = ("running", "interrupted", "failed")


def _raw_inputs(ws: Workspace, cfg) -> list:
    root = ws.path(cfg.input_dir)
    return sorted((str(p.relative_to(root)), file_sha256(p)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _maybe(path: Path) -> Optional[str]:
    return file_sha256(path) if path.exists() else None


class Pipeline:
    def __init__(self, ws: Workspace, force: bool, console: Console):
        self.ws, self.force, self.console = ws, force, console
        self.state_path = ws.state_dir / STATE_FILE
        self.state = read_json(self.state_path, {}) or {}
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def save(self) -> None:
        write_json(self.state_path, self.state)

    def mark(self, name: str, **values) -> None:
        """Record progress of a running stage, so an interrupted run can pick it up."""
        self.state[name].update(values)
        self.save()

    def stage(self, name: str, inputs: dict, outputs_ok: Callable[[dict], bool], run: Callable[[], dict]) -> dict:
        key = json_sha256(inputs)
        prev = self.state.get(name, {})
        if not self.force and prev.get("inputs") == key and prev.get("status") == "done" and outputs_ok(prev):
            self.console.print(f"[dim]{name}: up to date (inputs unchanged since {prev.get('finished')}), skipped[/]")
            self.skipped.append(name)
            self.timings[name] = 0.0
            return prev
        self.console.rule(f"[bold]{name}")
        t0 = time.time()
        # an unfinished attempt on the same inputs keeps what it recorded (e.g. the training run to resume)
        unfinished = prev if prev.get("inputs") == key and prev.get("status") in UNFINISHED else {}
        self.state[name] = unfinished | {"inputs": key, "status": "running", "started": now()}
        self.save()
        try:
            record = run()
        except BaseException as e:  # recorded as what it was; the stage's last good outputs stay as they were
            interrupted = isinstance(e, (KeyboardInterrupt, StageInterrupted))
            self.state[name] |= {"status": "interrupted" if interrupted else "failed", "ended": now(),
                                 "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
            self.save()
            raise
        self.timings[name] = time.time() - t0
        self.state[name] = {"inputs": key, "status": "done", "finished": now(), "seconds": round(self.timings[name], 1)} | record
        self.save()
        return self.state[name]


def run_pipeline(ws: Workspace, force: bool = False, console: Optional[Console] = None) -> dict:
    from opensem.forge import run_forge
    from opensem.golden import load_golden
    from opensem.judge import run_judge
    from opensem.models import resolve_base_model
    from opensem.train import run_training

    console = console or Console()
    t_start = time.time()
    fcfg, tcfg, ecfg = ws.forge_config(), ws.train_config(), ws.eval_config()  # all configs valid before any work
    load_golden(ws.path(ecfg.golden_set))
    p = Pipeline(ws, force, console)
    out_dir = ws.output_path(fcfg.output_dir, "forge.output_dir")
    train_path, test_path = ws.path(tcfg.datasets[0].path), ws.path(tcfg.test_datasets[0].path)
    golden_sha = file_sha256(ws.path(ecfg.golden_set))

    # 1. forge ------------------------------------------------------------------------------------------------
    p.stage(
        "forge",
        {"raw": _raw_inputs(ws, fcfg), "config": fcfg.model_dump(mode="json"), "golden": golden_sha},
        lambda prev: _maybe(train_path) == prev.get("train_sha") and _maybe(out_dir / "forge_manifest.json") is not None,
        lambda: (run_forge(ws, console=console), {"train_sha": file_sha256(train_path),
                                                   "manifest_sha": file_sha256(out_dir / "forge_manifest.json")})[1],
    )
    base = resolve_base_model(tcfg.base_model, ws.base_models_dir)
    judge_inputs = {"golden": golden_sha, "eval": ecfg.model_dump(mode="json"), "base": base.fingerprint}

    # 2. baseline ---------------------------------------------------------------------------------------------
    baseline = p.stage(
        "baseline",
        judge_inputs,
        lambda prev: (ws.root / prev.get("results", "-")).exists(),
        lambda: {"results": _rel(ws, ws.root / run_judge(ws, "baseline", console=console)["run_dir"] / "results.json")},
    )

    # 3. train ------------------------------------------------------------------------------------------------
    train_cfg = tcfg.model_dump(mode="json") | {"run_name": None}
    train_inputs = {"train": file_sha256(train_path), "test": _maybe(test_path), "config": train_cfg, "base": base.fingerprint}

    def do_train() -> dict:
        interrupted = p.state["train"].get("run_name")
        if interrupted and (ws.path(tcfg.output_dir) / interrupted / "checkpoints").exists():
            console.print(f"resuming interrupted training run {interrupted}")
            run_dir = run_training(ws, resume=True, run_name=interrupted, console=console)
        else:
            from opensem.train.recipe import default_run_name

            name = tcfg.run_name or default_run_name(tcfg)
            p.mark("train", run_name=name)
            run_dir = run_training(ws, run_name=name, console=console)
        return {"run_name": run_dir.name, "adapter": _rel(ws, run_dir), "adapter_sha": file_sha256(run_dir / "adapter_model.safetensors")}

    train = p.stage(
        "train",
        train_inputs,
        lambda prev: _maybe(ws.root / prev.get("adapter", "-") / "adapter_model.safetensors") == prev.get("adapter_sha"),
        do_train,
    )

    # 4. fine-tuned -------------------------------------------------------------------------------------------
    finetuned = p.stage(
        "fine-tuned",
        judge_inputs | {"adapter": train["adapter_sha"]},
        lambda prev: (ws.root / prev.get("results", "-")).exists(),
        lambda: {"results": _rel(ws, ws.root / run_judge(ws, "fine-tuned", adapter=str(ws.root / train["adapter"]),
                                                          console=console)["run_dir"] / "results.json")},
    )

    # 5. lineage + report -------------------------------------------------------------------------------------
    t0 = time.time()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    run_dir = ws.root / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    forge_manifest = read_json(out_dir / "forge_manifest.json", {})
    adapter_dir = ws.root / train["adapter"]
    adapter_manifest = read_json(adapter_dir / "manifest.json", {})
    base_res = read_json(ws.root / baseline["results"], {})
    ft_res = read_json(ws.root / finetuned["results"], {})
    cmp = ft_res.get("comparison", {})
    p.timings["report"] = time.time() - t0
    manifest = {
        "run_id": run_id,
        "created": now(),
        "workspace": str(ws.root),
        "stages": {k: {"skipped": k in p.skipped, "seconds": round(v, 1)} for k, v in p.timings.items()},
        "forge": {"manifest": _rel(ws, out_dir / "forge_manifest.json"), "manifest_sha256": _maybe(out_dir / "forge_manifest.json"),
                  "train_sha256": file_sha256(train_path), "teacher": forge_manifest.get("teacher"),
                  "counts": forge_manifest.get("counts"), "cost": forge_manifest.get("cost"), "inputs": forge_manifest.get("inputs")},
        "train": {"adapter": train["adapter"], "adapter_sha256": train["adapter_sha"],
                  "manifest_sha256": _maybe(adapter_dir / "manifest.json"),
                  "data_train_sha256": (adapter_manifest.get("data") or {}).get("train", {}).get("sha256"),
                  "forge_manifest_sha256": (adapter_manifest.get("data") or {}).get("forge_manifest_sha256"),
                  "base_model": adapter_manifest.get("base_model"), "engine": adapter_manifest.get("engine"),
                  "final_train_loss": adapter_manifest.get("final_train_loss"), "eval_loss": adapter_manifest.get("eval_loss"),
                  "tokens_per_s": adapter_manifest.get("tokens_per_s"), "config_sha": adapter_manifest.get("config_sha")},
        "baseline": {"results": baseline["results"], "results_sha256": _maybe(ws.root / baseline["results"]),
                     "summary": base_res.get("summary")},
        "fine_tuned": {"results": finetuned["results"], "results_sha256": _maybe(ws.root / finetuned["results"]),
                       "summary": ft_res.get("summary")},
        "judge": ft_res.get("judge"),
        "headline": _headline(cmp),
        "comparison": {k: v for k, v in cmp.items() if k != "regressions"} | {"regressions": len(cmp.get("regressions", []))},
        "versions": versions(),
    }
    write_json(run_dir / "run_manifest.json", manifest)
    from opensem.report_html import write_html_report

    write_html_report(run_dir / "report.html", manifest, forge_manifest, adapter_dir, base_res, ft_res)
    from opensem.judge import report as jreport

    (run_dir / "report.md").write_text(
        jreport.markdown(ft_res.get("judge", ""), base_res, ft_res, cmp, ft_res.get("lineage", {}), ft_res.get("forgetting")),
        encoding="utf-8",
    )
    _print_timings(console, p.timings, p.skipped, time.time() - t_start)
    console.print(f"run {run_id}: {_rel(ws, run_dir)}/report.html, report.md, run_manifest.json")
    if cmp:
        console.print(f"[bold]{manifest['headline']}[/]")
    return manifest


def _headline(cmp: dict) -> Optional[str]:
    from opensem.judge.report import headline

    return headline(cmp) if cmp else None


def _rel(ws: Workspace, path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ws.root))
    except ValueError:
        return str(path)


def _print_timings(console: Console, timings: dict, skipped: list, total: float) -> None:
    t = Table(title="stage times")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in timings.items():
        t.add_row(k, "skipped" if k in skipped else f"{v:.1f}")
    t.add_row("[bold]total", f"[bold]{total:.1f}")
    console.print(t)


def list_runs(ws: Workspace, console: Optional[Console] = None) -> list[dict]:
    console = console or Console()
    runs = []
    for f in sorted((ws.root / "runs").glob("*/run_manifest.json")):
        m = read_json(f, {})
        if m:
            runs.append(m)
    if not runs:
        raise OpenSEMError(f"no runs in {ws.root / 'runs'}: start one with `opensem run`")
    t = Table(title="runs")
    for col in ("run", "adapter", "pairs", "baseline", "fine-tuned", "diff [95% CI]", "accuracy"):
        t.add_column(col)
    for m in runs:
        b = (m.get("baseline") or {}).get("summary") or {}
        f = (m.get("fine_tuned") or {}).get("summary") or {}
        c = m.get("comparison") or {}
        ci = c.get("mean_diff_ci") or [None, None]
        t.add_row(
            m["run_id"], Path(m["train"]["adapter"]).name, str((m["forge"].get("counts") or {}).get("train", "-")),
            _n(b.get("mean_score")), _n(f.get("mean_score")),
            f"{_n(c.get('mean_diff'), '+.2f')} [{_n(ci[0])}, {_n(ci[1])}]",
            f"{_n((c.get('accuracy_baseline') or 0) * 100, '.0f')}% -> {_n((c.get('accuracy_fine_tuned') or 0) * 100, '.0f')}%",
        )
    console.print(t)
    return runs


def _n(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)
