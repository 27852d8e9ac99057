"""Where a launch runs: SkyPilot (any cloud it supports, through its CLI in its own environment), or this machine.

Both take the same task.yaml. ``LocalBackend`` (``--cloud local``) does what a SkyPilot node does with a task, on
this machine: the workdir copied to ``~/sky_workdir`` and the file mounts to their paths under a fresh home
folder, the setup then the run with bash, SkyPilot's node variables set (one process per node for
``num_nodes`` > 1), the secrets taken by name from the environment. Only provisioning is not exercised.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from opensem.errors import OpenSEMError
from opensem.launch.files import bring_home
from opensem.launch.task import DEADLINE_CODES, REMOTE_WORKDIR, DeadlineReached, deadline_report, require_sky


def validate(task_path: Path) -> str:
    """SkyPilot's own parser on the task (Task.from_yaml_config); returns its description of the task."""
    py = require_sky()
    code = ("import sys, yaml, sky\n"
            "t = sky.Task.from_yaml_config(yaml.safe_load(open(sys.argv[1])))\n"
            "print(f'{t.name}: {t.num_nodes} node(s), resources {t.resources}')")
    r = subprocess.run([str(py), "-c", code, str(task_path)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        last = ([x for x in r.stderr.splitlines() if x.strip()] or ["no output"])[-1]
        raise OpenSEMError(f"{task_path}: SkyPilot rejects the task: {last}")
    return r.stdout.strip().splitlines()[-1]


class SkyBackend:
    def __init__(self) -> None:
        py = require_sky()
        self.sky = str(py.parent / "sky")

    def _sky(self, *args: str, capture: bool = False, secrets: Optional[list[str]] = None) -> subprocess.CompletedProcess:
        # a secret is named on the command line and read by SkyPilot from the environment: its value is never an argument
        cmd = [self.sky, *args, *[x for n in (secrets or []) for x in ("--secret", n)]]
        r = subprocess.run(cmd, capture_output=capture, text=True)
        if r.returncode != 0:
            raise OpenSEMError(f"`sky {' '.join(args[:2])}` failed (exit {r.returncode})" + (f": {r.stderr.strip().splitlines()[-1]}" if capture and r.stderr.strip() else ""))
        return r

    def launch(self, task_path: Path, cluster: str, secrets: list[str], log: Path, **_) -> None:
        self._sky("launch", "-c", cluster, str(task_path), "--yes", "--detach-run", secrets=secrets)

    def status(self, cluster: str) -> str:
        return self._sky("status", cluster, capture=True).stdout + self._sky("queue", cluster, capture=True).stdout

    def logs(self, cluster: str, follow: bool = False) -> None:
        self._sky("logs", cluster, *([] if follow else ["--no-follow"]))

    def fetch(self, cluster: str, paths: list[str], dest: Path, inbox: Path) -> tuple[list[str], list[str]]:
        """rsync into ``inbox`` (regular files and folders only: no -l, no devices), then home through bring_home."""
        got, refused = [], []
        shutil.rmtree(inbox, ignore_errors=True)
        for rel in paths:
            target = inbox / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            # SkyPilot writes an ssh alias for every cluster: rsync reaches the head node by its name
            r = subprocess.run(["rsync", "-rtz", "--no-links", "--no-devices", "--no-specials", f"{cluster}:{REMOTE_WORKDIR}/{rel}",
                                str(target.parent) + "/"], capture_output=True, text=True)
            if r.returncode == 0:
                refused += bring_home(target, dest / rel, dest)
                got.append(rel)
            elif "No such file" not in r.stderr:
                raise OpenSEMError(f"fetching {rel} from {cluster} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        shutil.rmtree(inbox, ignore_errors=True)
        return got, refused

    def down(self, cluster: str) -> None:
        self._sky("down", cluster, "--yes")


class LocalBackend:
    """A SkyPilot node on this machine, under ``home`` (one home folder per node). With ``managed`` (a spot launch),
    also the managed-job controller: a node killed by a signal is replaced by a fresh one on the same bucket."""

    def __init__(self, root: Path, managed: bool = False, max_hours: float = 0.0) -> None:
        self.root = root
        self.managed = managed
        self.max_hours = max_hours  # what a run stopped by its deadline is told it ran into

    def home(self, node: int = 0) -> Path:
        return self.root / f"node{node}"

    @property
    def bucket(self) -> Path:
        return self.root.parent / "bucket"

    def launch(self, task_path: Path, cluster: str, secrets: list[str], log: Path, on_recovery=None) -> None:
        task = yaml.safe_load(task_path.read_text())
        nodes = int(task.get("num_nodes", 1))
        shutil.rmtree(self.root, ignore_errors=True)
        env_base = {k: v for k, v in os.environ.items() if not k.startswith("SKYPILOT_")}
        env_base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env_base.get('PATH', '')}"
        env_base.update({k: str(v) for k, v in (task.get("envs") or {}).items()})
        for name in secrets:  # by name, from this environment, into the child's environment only
            if os.environ.get(name):
                env_base[name] = os.environ[name]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as out:
            if self.managed:
                return self._managed(task, cluster, env_base, out, log, on_recovery)
            procs = []
            for node in range(nodes):
                work, env = self._node(node, node, nodes, task, env_base, cluster, out, log)
                procs.append(subprocess.Popen(["bash", "-c", task["run"]], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT))
            codes = [p.wait() for p in procs]
        if codes[0] in DEADLINE_CODES:
            raise DeadlineReached(deadline_report(self.home(0) / "sky_workdir", self.max_hours), log)
        if any(codes):
            raise OpenSEMError(f"the task's run failed (exit codes by node {codes}): see {log}")

    def _node(self, node: int, rank: int, nodes: int, task: dict, env_base: dict, cluster: str, out, log: Path):
        """A fresh node: its home, the workdir and file mounts (a bucket linked: every node shares it), the setup run."""
        from opensem.launch.managed import BUCKET_MOUNT

        home = self.home(node)
        work = home / "sky_workdir"
        shutil.copytree(task["workdir"], work, symlinks=True)
        for remote, local in (task.get("file_mounts") or {}).items():
            target = home / remote.removeprefix("~/")
            if remote == BUCKET_MOUNT:
                Path(local).mkdir(parents=True, exist_ok=True)
                target.symlink_to(Path(local).resolve(), target_is_directory=True)
            else:
                shutil.copytree(local, target, symlinks=True)
        env = env_base | {"HOME": str(home), "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": str(nodes),
                          "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes), "SKYPILOT_NUM_GPUS_PER_NODE": "0",
                          "SKYPILOT_TASK_ID": f"local-{cluster}"}
        out.write(f"== node {node}: setup ==\n")
        out.flush()
        r = subprocess.run(["bash", "-c", task["setup"]], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise OpenSEMError(f"the task's setup failed on node {node} (exit {r.returncode}): see {log}")
        out.write(f"== node {node}: run ==\n")
        out.flush()
        return work, env

    def _managed(self, task: dict, cluster: str, env_base: dict, out, log: Path, on_recovery) -> None:
        """SkyPilot's managed-job controller, here: run on a node; when a signal kills it (a preemption), a new node."""
        from opensem.launch.managed import MAX_LOCAL_RECOVERIES, WORKSPACE, run_node

        for node in range(MAX_LOCAL_RECOVERIES + 1):
            work, env = self._node(node, 0, 1, task, env_base, cluster, out, log)
            code = run_node(["bash", "-c", task["run"]], work, env, out, self.root / "node.pid")
            if code == 0:
                return
            if code in DEADLINE_CODES:
                raise DeadlineReached(deadline_report(self.bucket / WORKSPACE, self.max_hours), log)
            if code > 0:
                raise OpenSEMError(f"the task's run failed on node {node} (exit {code}): see {log}")
            out.write(f"== node {node} lost (signal {-code}): a new node takes over ==\n")
            out.flush()
            if on_recovery:
                on_recovery(node + 1)
        raise OpenSEMError(f"the job lost {MAX_LOCAL_RECOVERIES + 1} nodes in a row: see {log}")

    def status(self, cluster: str) -> str:
        return f"{cluster}: local, folders under {self.root}" if self.root.exists() else f"{cluster}: no local run"

    def logs(self, cluster: str, follow: bool = False) -> None:
        log = self.root.parent / "job.log"
        sys.stdout.write(log.read_text() if log.exists() else "no log\n")

    def fetch(self, cluster: str, paths: list[str], dest: Path, inbox: Path) -> tuple[list[str], list[str]]:
        from opensem.launch.managed import WORKSPACE

        got, refused = [], []
        work = self.bucket / WORKSPACE if self.managed else self.home(0) / "sky_workdir"
        for rel in paths:
            src = work / rel
            if not src.exists() and not src.is_symlink():
                continue
            refused += bring_home(src, dest / rel, dest)
            got.append(rel)
        return got, refused

    def down(self, cluster: str) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
