"""`opensem run`: the declared stages (configs/pipeline_config.yaml, default forge -> baseline -> train ->
fine-tuned), then the run manifest and reports.

The pipeline knows the stage contract (opensem.stages) and nothing of any stage's files: each stage says
what its inputs are and returns a typed result (artifacts with content hashes, and a summary). A stage is
skipped when its inputs hash to the same key as its last success and its artifacts are unchanged
(``--force`` redoes all); an interrupted stage keeps what it recorded (the training run to resume), and a
failed one is recorded as failed. Every run writes ``runs/{run_id}/`` with run_manifest.json (every
stage's summary and artifacts, tied together by content hash), and, when a judge stage ran, report.md
(and report.html when a fine-tuned model was compared with a baseline, in this run or an earlier one).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from rich.table import Table

from opensem.errors import ConfigError, OpenSEMError, StageInterrupted
from opensem.lineage import json_sha256, now, read_json, versions, write_json
from opensem.stages import (STATE_FILE, Artifact, Context, Stage, StageResult, finished_record, load_stage, needed_results,
                             stage_configs, stage_report)
from opensem.terminal import Console
from opensem.workspace import Workspace

UNFINISHED = ("running", "interrupted", "failed")


class Pipeline:
    def __init__(self, ws: Workspace, force: bool, console: Console):
        self.ws, self.force, self.console = ws, force, console
        self.state_path = ws.state_dir / STATE_FILE
        self.state = read_json(self.state_path, {}) or {}
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self.results: dict[str, StageResult] = {}

    def save(self) -> None:
        write_json(self.state_path, self.state)

    def mark(self, name: str, **values) -> None:
        """Record progress of a running stage, so an interrupted run can pick it up."""
        self.state[name].update(values)
        self.save()

    def run_stage(self, stage: Stage) -> StageResult:
        ctx = Context(self.ws, self.console, dict(self.results))
        result = self.stage(stage.name, stage.inputs(ctx), lambda record: stage.run(
            Context(self.ws, self.console, dict(self.results), record, lambda **v: self.mark(stage.name, **v))))
        self.results[stage.name] = result
        return result

    def stage(self, name: str, inputs: dict, run) -> StageResult:
        """Skip, resume or run one stage; ``run(record)`` gets what an unfinished attempt recorded."""
        key = json_sha256(inputs)
        prev = self.state.get(name, {})
        if not self.force and prev.get("inputs") == key and prev.get("status") == "done" and "result" in prev:  # older records: rerun
            done = StageResult.from_json(prev["result"])
            if done.unchanged(self.ws):
                self.console.print(f"[dim]{name}: up to date (inputs unchanged since {prev.get('finished')}), skipped[/]")
                self.skipped.append(name)
                self.timings[name] = 0.0
                return done
        self.console.rule(f"[bold]{name}")
        t0 = time.time()
        # an unfinished attempt on the same inputs keeps what it recorded (e.g. the training run to resume)
        unfinished = prev if prev.get("inputs") == key and prev.get("status") in UNFINISHED else {}
        record = {k: v for k, v in unfinished.items() if k not in ("inputs", "status", "started", "ended", "error")}
        self.state[name] = unfinished | {"inputs": key, "status": "running", "started": now()}
        self.save()
        try:
            result = run(record)
        except BaseException as e:  # recorded as what it was; the stage's last good outputs stay as they were
            interrupted = isinstance(e, (KeyboardInterrupt, StageInterrupted))
            self.state[name] |= {"status": "interrupted" if interrupted else "failed", "ended": now(),
                                 "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
            self.save()
            raise
        self.timings[name] = time.time() - t0
        self.state[name] = {"inputs": key, "status": "done", "finished": now(), "seconds": round(self.timings[name], 1),
                            "result": result.to_json()}
        self.state.setdefault("results", {})[name] = finished_record(result, "opensem run")
        self.save()
        return result


def prepare(ws: Workspace, stages: list[Stage]) -> dict[str, StageResult]:
    """Before any work: every config a stage reads valid, every stage's own checks passed, every need met. Returns
    the needs met by earlier results in the workspace."""
    for stage in stages:
        for section in stage_configs(stage):
            ws.config(section)
    for stage in stages:
        if hasattr(stage, "check"):
            stage.check(ws)
    return needed_results(ws, stages)


def run_one(ws: Workspace, spec: str, force: bool = False, console: Optional[Console] = None) -> StageResult:
    """`opensem stage NAME`: one stage as `opensem run` runs it (skipped when up to date, resumed when interrupted), its
    needs taken from the workspace's last results; its result is recorded for the stages after it."""
    console = console or Console()
    stage = load_stage(spec)
    p = Pipeline(ws, force, console)
    p.results |= prepare(ws, [stage])
    result = p.run_stage(stage)
    console.print(f"{stage.name}: " + ", ".join(f"{k} {a.path}" for k, a in result.artifacts.items()))
    return result


def run_pipeline(ws: Workspace, force: bool = False, console: Optional[Console] = None) -> dict:
    console = console or Console()
    t_start = time.time()
    # every stage loadable, every config a stage reads valid, every stage's own checks passed and needs met, before any work
    stages = [load_stage(name) for name in ws.pipeline_config().stages]
    needed = prepare(ws, stages)
    p = Pipeline(ws, force, console)
    p.results |= needed
    for stage in stages:
        p.run_stage(stage)
    t0 = time.time()
    run_id, run_dir = _new_run(ws)
    manifest = run_manifest(ws, run_id, p, stages)
    write_json(run_dir / "run_manifest.json", manifest)
    reports = write_reports(ws, run_dir, manifest, p.results, {s.name: s for s in stages})
    p.timings["report"] = time.time() - t0
    _print_timings(console, p.timings, p.skipped, time.time() - t_start)
    console.print(f"run {run_id}: {_rel(ws, run_dir)}/" + ", ".join(["run_manifest.json", *reports]))
    if manifest.get("headline"):
        console.print(f"[bold]{manifest['headline']}[/]")
    for key in ("retrieval_line", "recommendation", "diagnosis"):
        if manifest.get(key):
            console.print(f"[bold]{manifest[key]}[/]")
    return manifest


def _new_run(ws: Workspace) -> tuple[str, Path]:
    runs = ws.root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        run_id = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (runs / run_id).mkdir()
            return run_id, runs / run_id
        except FileExistsError:
            continue
    raise OpenSEMError(f"{runs}: too many runs named {stamp}")


def run_manifest(ws: Workspace, run_id: str, p: Pipeline, stages: list[Stage]) -> dict:
    """Every stage's summary under its name (fine-tuned -> fine_tuned) and its artifacts, tied by content hash."""
    manifest: dict = {"run_id": run_id, "created": now(), "workspace": str(ws.root),
                      "pipeline": [s.name for s in stages],
                      "stages": {k: {"skipped": k in p.skipped, "seconds": round(v, 1)} for k, v in p.timings.items()}}
    for s in stages:
        result = p.results[s.name]
        manifest[s.name.replace("-", "_")] = result.summary | {"artifacts": {k: vars(a) for k, a in result.artifacts.items()}}
        for key in ("judge", "headline", "comparison", "retrieval_line", "recommendation", "recommended", "diagnosis"):  # the last stage reporting one: the run's
            if result.summary.get(key) is not None:
                manifest[key] = result.summary[key]
    manifest["versions"] = versions()
    return manifest


def write_reports(ws: Workspace, run_dir: Path, manifest: dict, results: dict[str, StageResult], stages: dict) -> list[str]:
    """The judge report (Markdown and HTML) for any run with a judged stage: the last stage whose details hold judged
    items is the page's model; its comparison's baseline is this run's, or the one it was compared with on disk.
    Each stage of the run adds its own sections (``report``); stages that did not run in this pipeline add none (no
    loss curve without training). A run that judged nothing gets report.md with the sections alone."""
    from opensem.judge import report as jreport
    from opensem.report_html import write_html_report

    details = {n: stages[n].details(ws, r) for n, r in results.items() if hasattr(stages.get(n), "details")}
    judged = [n for n, d in details.items() if isinstance(d, dict) and isinstance(d.get("items"), list) and "summary" in d]
    sections = [sec for n, r in results.items() if n in stages for sec in stage_report(stages[n], ws, r)]
    if not judged:  # no model judged: the stages' own sections, if they have any
        if not any(sec.shown for sec in sections):
            return []
        (run_dir / "report.md").write_text(f"# OpenSEM run {manifest['run_id']}\n\n"
                                           + "\n".join(sec.markdown() for sec in sections if sec.shown), encoding="utf-8")
        return ["report.md"]
    tuned_name = next((n for n in reversed(judged) if details[n].get("comparison")), None)
    ft_res = details[tuned_name] if tuned_name else None
    base_res = next((details[n] for n in judged if details[n].get("mode") == "baseline"), None)
    if base_res is None and ft_res and ft_res.get("baseline_run"):
        base_res = read_json(ws.path(ft_res["baseline_run"]) / "results.json", None)
    shown = ft_res or base_res
    train = next((d for d in reversed(list(details.values())) if isinstance(d, dict) and isinstance(d.get("log"), list)), {})
    written = ["report.md"]
    (run_dir / "report.md").write_text(
        jreport.markdown(shown.get("judge", ""), base_res, ft_res, (ft_res or {}).get("comparison"), shown.get("lineage", {}),
                         (ft_res or {}).get("forgetting"), (ft_res or {}).get("retrieval_comparisons"),
                         (ft_res or {}).get("recommendation"))
        + "".join("\n" + sec.markdown() for sec in sections if sec.shown),
        encoding="utf-8",
    )
    if ft_res and base_res:
        write_html_report(run_dir / "report.html", manifest, sections, train.get("log", []), base_res, ft_res)
        written.insert(0, "report.html")
    return written


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
    """Past runs, one row each: every stage's own cells (its ``columns``), then the run's comparison."""
    console = console or Console()
    runs = []
    for f in sorted((ws.root / "runs").glob("*/run_manifest.json")):
        m = read_json(f, {})
        if m:
            runs.append(m)
    if not runs:
        raise OpenSEMError(f"no runs in {ws.root / 'runs'}: start one with `opensem run`")
    rows = [run_row(m) for m in runs]
    cols = list(dict.fromkeys(k for row in rows for k in row if k not in ("diff [95% CI]", "accuracy")))
    cols += ["diff [95% CI]", "accuracy"]
    t = Table(title="runs")
    for col in cols:
        t.add_column(col)
    for row in rows:
        t.add_row(*(row.get(col, "-") for col in cols))
    console.print(t)
    return runs


def run_row(m: dict) -> dict[str, str]:
    """A run's cells: the run id, each stage's (a stage that cannot be loaded any more has none), the comparison."""
    row = {"run": m["run_id"]}
    for name in m.get("pipeline", []):
        entry = m.get(name.replace("-", "_"))
        try:
            stage = load_stage(name)
        except ConfigError:
            continue
        if entry and hasattr(stage, "columns"):
            row |= stage.columns(entry)
    c = m.get("comparison") or {}
    ci = c.get("mean_diff_ci") or [None, None]
    if c:
        row["diff [95% CI]"] = f"{_n(c.get('mean_diff'), '+.2f')} [{_n(ci[0])}, {_n(ci[1])}]"
        row["accuracy"] = (f"{_n((c.get('accuracy_baseline') or 0) * 100, '.0f')}% -> "
                           f"{_n((c.get('accuracy_fine_tuned') or 0) * 100, '.0f')}%")
    return row


def compare_runs(ws: Workspace, a: str, b: str, console: Optional[Console] = None) -> dict:
    """Two runs' fine-tuned models on the same golden set, paired question by question: B minus A.

    The answer to "did this change help on my data?" (continued pre-training first, another learning rate...),
    with the same statistics as Baseline vs Fine-Tuned: mean score difference, 95% bootstrap CI, win/tie/loss."""
    from opensem.judge import report

    console = console or Console()
    runs = {}
    for run_id in (a, b):
        m = read_json(ws.root / "runs" / run_id / "run_manifest.json", {})
        if not m:
            raise OpenSEMError(f"runs/{run_id}: no run manifest there: see `opensem runs` for the run ids")
        judged = _judged_model(m)
        if judged is None:
            raise OpenSEMError(f"runs/{run_id}: this run has no judged model compared with a baseline")
        stage, result = judged
        if not result.unchanged(ws):
            raise OpenSEMError(f"runs/{run_id}: its judge results were changed or removed since the run")
        runs[run_id] = stage.details(ws, result)
    ra, rb = runs[a], runs[b]
    for key in ("golden_set", "judge"):
        if ra["lineage"].get(key) != rb["lineage"].get(key):
            raise OpenSEMError(f"runs {a} and {b} differ in their {key.replace('_', ' ')} ({ra['lineage'].get(key)} vs "
                               f"{rb['lineage'].get(key)}): only runs judged alike can be compared")
    ecfg = ws.eval_config()
    cmp = report.compare(ra["items"], rb["items"], ra["pass_threshold"], ecfg.bootstrap_samples, ecfg.seed)
    t = Table(title=f"{b} vs {a}: the same {cmp['paired_n']} golden questions, the same judge")
    for col in ("", a, b):
        t.add_column(col)
    t.add_row("model", _model(ra), _model(rb))
    t.add_row("mean judge score", _n(ra["summary"]["mean_score"]), _n(rb["summary"]["mean_score"]))
    t.add_row("accuracy", f"{_n(cmp['accuracy_baseline'] * 100, '.1f')}%", f"{_n(cmp['accuracy_fine_tuned'] * 100, '.1f')}%")
    console.print(t)
    ci = cmp["mean_diff_ci"]
    verdict = ("better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no different (the interval holds 0)")
    console.print(f"mean score difference {b} - {a}: {cmp['mean_diff']:+.2f}, 95% CI [{ci[0]:.2f}, {ci[1]:.2f}]; "
                  f"win / tie / loss {cmp['wins']} / {cmp['ties']} / {cmp['losses']}: {b} is {verdict}", soft_wrap=True)
    if ra.get("retrieval") and rb.get("retrieval"):
        cmp["with_retrieval"] = _compare_with_retrieval(console, a, b, ra, rb, ecfg)
    return cmp


def _compare_with_retrieval(console: Console, a: str, b: str, ra: dict, rb: dict, ecfg) -> dict:
    """Both runs judged with retrieval too: their four rows paired (e.g. a RAFT adapter against plain SFT, each with
    and without retrieval)."""
    from opensem.judge import report

    rows = {a: ra["items"], f"{a} + retrieval": ra["retrieval"]["items"], b: rb["items"], f"{b} + retrieval": rb["retrieval"]["items"]}
    pairs = [(f"{a} + retrieval", f"{b} + retrieval"), (a, f"{b} + retrieval"), (f"{a} + retrieval", b)]
    t = Table(title="with retrieval: paired on the same golden questions")
    for col in ("", "mean score difference", "95% CI", "win / tie / loss"):
        t.add_column(col)
    out = {}
    for x, y in pairs:
        c = report.compare(rows[x], rows[y], ra["pass_threshold"], ecfg.bootstrap_samples, ecfg.seed)
        t.add_row(f"{y} vs {x}", f"{c['mean_diff']:+.2f}", f"[{c['mean_diff_ci'][0]:.2f}, {c['mean_diff_ci'][1]:.2f}]",
                  f"{c['wins']} / {c['ties']} / {c['losses']}")
        out[f"{y} vs {x}"] = {k: v for k, v in c.items() if k != "regressions"}
    console.print(t)
    return out


def _judged_model(m: dict) -> Optional[tuple[Stage, StageResult]]:
    """The run's final judged model: the last stage whose results hold a comparison with the baseline."""
    for name in reversed(m.get("pipeline", [])):
        entry = m.get(name.replace("-", "_")) or {}
        try:
            stage = load_stage(name)
        except ConfigError:
            continue
        if entry.get("comparison") and hasattr(stage, "details"):
            return stage, StageResult(name, {k: Artifact(**v) for k, v in entry["artifacts"].items()}, entry)
    return None


def _model(res: dict) -> str:
    """The judged model as its lineage names it: the chain that made it, else its adapter's folder name."""
    lineage = res.get("lineage") or {}
    return lineage.get("chain") or Path(str(lineage.get("adapter", "-")).split(" ")[0]).name


def _n(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)
