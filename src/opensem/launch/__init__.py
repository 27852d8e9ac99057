"""`opensem launch`: the pipeline on a rented GPU through SkyPilot, with a budget, autodown, and results brought home.

    launch  plan (GPU, stages, what syncs, what comes back, the budget rule) -> task.yaml, checked by SkyPilot's
            parser -> the budget refused or accepted -> `sky launch` (or this machine with --cloud local); a spot
            launch is a managed job that survives preemption (launch/managed.py)
    status / logs / fetch / down    the cluster's job queue, its log, the outputs rsynced home (each fetched run
            manifest then records where it ran: cloud, GPU, hours, cost), teardown
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from rich.markup import escape

from opensem.errors import OpenSEMError
from opensem.launch import managed
from opensem.launch.task import DeadlineReached, Plan, check_budget, launch_dir, make_plan, stage
from opensem.lineage import now, read_json, write_json
from opensem.terminal import Console, visible
from opensem.workspace import Workspace

RECORD = "launch.json"


def backend_for(ws: Workspace, plan: dict, cluster: str):
    """Where a launch runs: this machine (``local``), SkyPilot's managed jobs (spot), or a SkyPilot cluster."""
    from opensem.launch.backends import LocalBackend, SkyBackend
    from opensem.launch.managed import SkyJobsBackend

    if plan["cloud"] == "local":
        return LocalBackend(launch_dir(ws, cluster) / "local", managed=bool(plan.get("use_spot")), max_hours=plan.get("max_hours", 0.0))
    return SkyJobsBackend(plan.get("bucket")) if plan.get("use_spot") else SkyBackend()


def describe(plan: Plan, task_text: str, validated: Optional[str]) -> str:
    budget = (f"${plan.price_per_hour}/h x {plan.max_hours} h = ${plan.budget_usd} ({plan.price_source})"
              if plan.price_per_hour is not None else f"price unknown ({plan.price_source})")
    cap = f"; refused above --max-cost ${plan.max_cost_usd}" if plan.max_cost_usd is not None else "; no --max-cost set"
    lines = [
        f"cluster     {plan.cluster} on {plan.cloud}, {plan.nodes} node(s), GPU {plan.gpu or 'none (CPU)'}, engine {plan.engine}",
        f"stages      {' -> '.join(plan.stages)}",
        f"uploads     {', '.join(plan.sync) or 'nothing'} (workdir) and this OpenSEM's source (installed by the setup)",
        *[f"stays home  {path}: {why}" for path, why in plan.left_home],
        f"comes back  {', '.join(plan.fetch)} (`opensem launch fetch`)",
        f"secrets     passed by name: {', '.join(plan.secrets) or 'none set here'}"
        + (f"; not set here: {', '.join(plan.secrets_unset)}" if plan.secrets_unset else ""),
        f"budget      {budget}{cap}",
        f"deadline    the job is interrupted (Ctrl-C, checkpoint saved) after {plan.max_hours} h; the cluster is deleted "
        f"after {plan.idle_minutes} idle minutes (autodown), even if this machine is off",
        *managed.describe(plan),
    ]
    if validated:
        lines.append(f"SkyPilot    {validated}")
    return "\n".join(lines) + "\n\n# task.yaml\n" + task_text


def launch(ws: Workspace, console: Console, dry_run: bool = False, **options) -> Path:
    """Plan, stage, check, then launch; ``options`` override launch_config.yaml (cloud, gpu, nodes, stages, max_hours,
    max_cost, spot)."""
    from opensem.launch.backends import validate
    from opensem.launch.task import sky_python

    plan = make_plan(ws, price_lookup=not dry_run, **options)
    task_path, _ = stage(ws, plan)
    validated = validate(task_path) if sky_python() else None
    text = describe(plan, task_path.read_text(encoding="utf-8"), validated)
    if dry_run:
        print(visible(text), end="")
        return task_path
    check_budget(plan)
    console.print(text.split("\n\n# task.yaml")[0], markup=False, highlight=False)
    d = launch_dir(ws, plan.cluster)
    record = {"cluster": plan.cluster, "plan": plan.to_json(), "task": str(task_path), "launched": now(), "launched_ts": time.time(),
              "status": "launching"}
    write_json(d / RECORD, record)
    def recovered(count: int) -> None:  # a node lost and replaced (the local controller)
        record["recoveries"] = count
        write_json(d / RECORD, record)
        console.print(f"[yellow]{plan.cluster}: node lost; recovery {count} on a new node[/]")

    try:
        backend_for(ws, plan.to_json(), plan.cluster).launch(task_path, plan.cluster, plan.secrets, d / "job.log",
                                                             on_recovery=recovered)
    except DeadlineReached as e:  # the run ended by max_hours: what it was doing, what finished
        record["status"] = e.report
        write_json(d / RECORD, record)
        raise
    except BaseException:
        record["status"] = "launch failed"
        write_json(d / RECORD, record)
        raise
    record["status"] = "finished" if plan.cloud == "local" else "running"
    write_json(d / RECORD, record)
    console.print(f"launched {plan.cluster}: `opensem launch status`, `opensem launch logs`, then `opensem launch fetch` "
                  f"and `opensem launch down`")
    return task_path


def _record(ws: Workspace, cluster: Optional[str]) -> dict:
    base = ws.state_dir / "launch"
    records = [read_json(p, {}) for p in base.glob(f"{cluster or '*'}/{RECORD}")]
    records = [r for r in records if r]
    if not records:
        raise OpenSEMError(f"no launch {('named ' + repr(cluster)) if cluster else ''} in this workspace: `opensem launch --cloud ...` first")
    return max(records, key=lambda r: r.get("launched_ts", 0))


def status(ws: Workspace, cluster: Optional[str]) -> str:
    r = _record(ws, cluster)
    text = f"{r['cluster']}: {r['status']} (launched {r['launched']})\n"
    if r["plan"].get("use_spot"):  # recoveries, cost so far, deadline
        started, nodes = None, None
        if r["plan"]["cloud"] == "local":  # the job's own record of its nodes, on the bucket
            mark = launch_dir(ws, r["cluster"]) / "bucket" / managed.WORKSPACE / ".opensem" / f"launch-{r['plan'].get('launch_id')}"
            started = float(mark.read_text().strip()) if mark.exists() and mark.read_text().strip() else None
            nodes = len(mark.with_name(mark.name + ".nodes").read_text().split()) if mark.with_name(mark.name + ".nodes").exists() else None
        text += managed.progress(r, started, nodes)
    return text + backend_for(ws, r["plan"], r["cluster"]).status(r["cluster"])


def logs(ws: Workspace, cluster: Optional[str], follow: bool = False) -> None:
    r = _record(ws, cluster)
    backend_for(ws, r["plan"], r["cluster"]).logs(r["cluster"], follow)


def fetch(ws: Workspace, cluster: Optional[str], console: Console) -> list[str]:
    """Bring the outputs home; each run manifest made by this launch records where it ran."""
    r = _record(ws, cluster)
    plan = r["plan"]
    before = {p.parent.name for p in ws.path("runs").glob("*/run_manifest.json")}
    got, refused = backend_for(ws, plan, r["cluster"]).fetch(r["cluster"], plan["fetch"], ws.root,
                                                                      launch_dir(ws, r["cluster"]) / "inbox")
    hours = round((time.time() - r["launched_ts"]) / 3600, 3)
    where = {"cloud": plan["cloud"], "gpu": plan["gpu"], "nodes": plan["nodes"], "cluster": r["cluster"], "launched": r["launched"],
             "fetched": now(), "hours_launch_to_fetch": hours, "price_per_hour": plan["price_per_hour"],
             "cost_usd_upper_bound": None if plan["price_per_hour"] is None else round(hours * plan["price_per_hour"], 2)}
    for m in ws.path("runs").glob("*/run_manifest.json"):
        if m.is_symlink() or m.parent.is_symlink():
            continue
        if m.parent.name not in before or read_json(m, {}).get("launch", {}).get("cluster") == r["cluster"]:
            data = read_json(m)
            data["launch"] = where
            write_json(m, data)
    r.update(status="fetched", fetched=where["fetched"], fetched_paths=got, refused=refused)
    write_json(launch_dir(ws, r["cluster"]) / RECORD, r)
    console.print(f"fetched from {r['cluster']}: {', '.join(got) or 'nothing yet'}")
    for what in refused:
        console.print(f"[yellow]refused[/] {escape(what)}")
    return got


def down(ws: Workspace, cluster: Optional[str], console: Console) -> None:
    r = _record(ws, cluster)
    backend_for(ws, r["plan"], r["cluster"]).down(r["cluster"])
    r["status"] = "down"
    write_json(launch_dir(ws, r["cluster"]) / RECORD, r)
    console.print(f"{r['cluster']} is down")
