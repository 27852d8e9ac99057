"""Spot launches that survive preemption: SkyPilot managed jobs with the workspace on a bucket.

`opensem launch --spot` (or ``use_spot: true``) runs the pipeline as a managed job (`sky jobs launch`). When the
cloud takes the spot node back, SkyPilot's controller starts a new node and runs the task again. What the job has
done lives on a bucket mounted into it (``launch.bucket``, any store SkyPilot mounts: s3://, gs://, r2://, ...):

    ~/opensem-bucket/workspace/     the workspace the job runs in: a launch's first node copies the upload there;
                                    a node that replaces a preempted one finds it as it was left
        models/adapters/{run}/checkpoints/   -> training resumes from the last complete checkpoint
        .opensem/cache/                      -> no finished teacher call is paid twice
        .opensem/pipeline_state.json         -> finished stages are skipped
        .opensem/launch-{id}, launch-{id}.nodes   when the launch's first node started; one line per node

The deadline (``max_hours``) counts from the first node's start, so every node of the job together stays
within it, and the budget (price x max_hours) holds across recoveries. `opensem launch status` shows the
recoveries, the cost so far and the time left. With ``--cloud local`` a controller on this machine does what
SkyPilot's does: a node killed by a signal is replaced by a fresh one (a new home, the task's setup and run
again) on the same bucket, a folder under the launch folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from opensem.errors import ConfigError, OpenSEMError

BUCKET_MOUNT = "~/opensem-bucket"
WORKSPACE = "workspace"  # the job's workspace, inside the bucket
STORES = ("s3", "gs", "r2", "az", "cos", "oci", "https")  # what SkyPilot mounts (https: an Azure blob container)
NO_BUCKET_MOUNTS = {"runpod"}  # SkyPilot mounts no bucket there
FULL_RECOVERY = "aws, gcp, azure, lambda, kubernetes"
MAX_LOCAL_RECOVERIES = 10


def check_bucket(bucket: Optional[str], cloud: str) -> Optional[str]:
    """The bucket a spot job keeps its workspace on: a store URL, or None where the cloud mounts none."""
    if cloud == "local" or cloud in NO_BUCKET_MOUNTS:
        return None
    if not bucket:
        raise ConfigError("configs/launch_config.yaml: key 'bucket': a spot launch keeps its checkpoints, teacher replies and "
                          f"finished stages on a bucket: set bucket: s3://NAME/PATH (or {', '.join(s + '://' for s in STORES[1:-1])}), "
                          "or use_spot: false")
    if not re.fullmatch(rf"({'|'.join(STORES)})://[A-Za-z0-9][A-Za-z0-9._/-]*", bucket):
        raise ConfigError(f"configs/launch_config.yaml: key 'bucket': {bucket!r} is not a bucket URL: use "
                          f"{', '.join(s + '://NAME/PATH' for s in STORES[:3])}, ...")
    return bucket


def describe(plan) -> list[str]:
    """The plan's lines about preemption: what recovers and where it is kept, or what is lost where no bucket mounts."""
    if not plan.use_spot:
        return []
    if plan.cloud in NO_BUCKET_MOUNTS:
        return [f"spot        a managed job: a preempted node is replaced, but SkyPilot mounts no bucket on {plan.cloud}: the new node "
                f"starts the pipeline over (teacher calls and training again; sync_cache: true keeps the replies made here). "
                f"Clouds that recover fully with launch.bucket: {FULL_RECOVERY}"]
    where = plan.bucket or "a folder under the launch folder (local)"
    return [f"spot        a managed job: a preempted node is replaced by a new one, which resumes from {where} (checkpoints, "
            f"teacher replies, finished stages); the deadline and budget count every node"]


def run_script(plan, head: str, sets: list[str]) -> str:
    """The managed job's run: the workspace on the bucket, the deadline from the first node's start."""
    from opensem.launch.task import after_deadline

    seconds = int(plan.max_hours * 3600)
    return head + f"""WS="$HOME/{BUCKET_MOUNT.removeprefix('~/')}/{WORKSPACE}"
STARTED="$WS/.opensem/launch-$OPENSEM_LAUNCH_ID"
mkdir -p "$WS/.opensem"
if [ -s "$STARTED" ]; then
  # a node replacing a preempted one: the bucket's workspace as it was left (checkpoints, replies, finished stages)
  cp -rn ~/sky_workdir/. "$WS"/ 2>/dev/null || true
else
  # the launch's first node: the uploaded workspace onto the bucket (what an earlier launch left there is reused)
  cp -r ~/sky_workdir/. "$WS"/ && date +%s > "$STARTED"
fi
date +%s >> "$STARTED.nodes"
LEFT=$(( {seconds} - ( $(date +%s) - $(cat "$STARTED") ) ))
if [ "$LEFT" -le 0 ]; then echo "deadline: {plan.max_hours} h have passed since the job's first node started; nothing more is run"; exit 124; fi
echo "node $(wc -l < "$STARTED.nodes") of this launch, $LEFT s before the deadline"
cd "$WS"
timeout --signal=INT --kill-after=300 "$LEFT" opensem run {' '.join(sets)}
""" + after_deadline(plan)


def file_mount(plan, local_bucket: Path) -> dict:
    """The bucket's entry in the task's file_mounts."""
    if plan.cloud == "local":
        return {BUCKET_MOUNT: str(local_bucket)}
    if plan.bucket:  # MOUNT_CACHED: writes go to a local cache first and up in the background (SkyPilot's advice for checkpoints)
        return {BUCKET_MOUNT: {"source": plan.bucket, "mode": "MOUNT_CACHED"}}
    return {}


def progress(record: dict, started: Optional[float] = None, nodes: Optional[int] = None) -> str:
    """Recoveries, cost so far and time left of a spot launch. ``started``: when its first node started (else the launch)."""
    plan = record["plan"]
    t0 = started or record.get("launched_ts") or time.time()
    hours = (time.time() - t0) / 3600
    left = plan["max_hours"] - hours
    price = plan.get("price_per_hour")
    cost = "price unknown" if price is None else f"${hours * price:.2f} so far at most (${price}/h, one node at a time)"
    recoveries = (f"{record.get('recoveries', 0)}" + (f" ({nodes} node(s) started)" if nodes else "") if plan["cloud"] == "local"
                  else "the RECOVERIES column of SkyPilot's job queue below")
    lines = [f"recoveries  {recoveries}",
             f"cost        {cost}; budget ${plan.get('budget_usd')}" if price is not None else f"cost        {cost}",
             f"deadline    {max(0.0, left):.2f} h left of {plan['max_hours']} h" if left > 0
             else f"deadline    passed ({plan['max_hours']} h since the first node started): the job has stopped itself"]
    return "\n".join(lines) + "\n"


class SkyJobsBackend:
    """SkyPilot managed jobs: `sky jobs launch / queue / logs / cancel`, the job named after the cluster."""

    def __init__(self, bucket: Optional[str] = None) -> None:
        from opensem.launch.backends import SkyBackend

        self.cli = SkyBackend()
        self.bucket = bucket

    def launch(self, task_path: Path, cluster: str, secrets: list[str], log: Path, **_) -> None:
        self.cli._sky("jobs", "launch", "-n", cluster, str(task_path), "--yes", "--detach-run", secrets=secrets)

    def status(self, cluster: str) -> str:
        return self.cli._sky("jobs", "queue", capture=True).stdout

    def logs(self, cluster: str, follow: bool = False) -> None:
        self.cli._sky("jobs", "logs", "-n", cluster, *([] if follow else ["--no-follow"]))

    def fetch(self, cluster: str, paths: list[str], dest: Path, inbox: Path) -> tuple[list[str], list[str]]:
        """The node is gone: the outputs come from the bucket's workspace, through SkyPilot's own download command for
        the store (`aws s3 sync` for s3, `gsutil rsync` for gs, ...), into ``inbox``, then home as every fetch."""
        from opensem.launch.files import bring_home

        if not self.bucket:
            raise OpenSEMError(f"{cluster} ran as a managed job without launch.bucket: its outputs went with its node")
        base = f"{self.bucket.rstrip('/')}/{WORKSPACE}"
        shutil.rmtree(inbox, ignore_errors=True)
        inbox.mkdir(parents=True)
        got, refused, failed = [], [], []
        for rel in paths:
            (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(["bash", "-c", download_command(f"{base}/{rel}", inbox / rel, folder=not Path(rel).suffix)],
                               capture_output=True, text=True, env=_with_sky_tools())
            if r.returncode != 0:
                failed.append(f"{base}/{rel}: not fetched: {(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}")
            elif (inbox / rel).exists():
                refused += bring_home(inbox / rel, dest / rel, dest)
                got.append(rel)
        if failed and not got:
            raise OpenSEMError(f"nothing came from {base}: {failed[0]}")
        return got, refused + failed

    def down(self, cluster: str) -> None:
        self.cli._sky("jobs", "cancel", "-n", cluster, "--yes")


# the command line tool each store's download needs, and how to get it (checked first: SkyPilot's commands would install
# it into your home folder)
STORE_TOOLS = {"s3": ("aws", "make setup-launch SKY_EXTRAS=aws"), "r2": ("aws", "make setup-launch SKY_EXTRAS=aws"),
               "gs": ("gsutil", "the Google Cloud SDK (gcloud, gsutil)"), "cos": ("rclone", "rclone"), "oci": ("oci", "the OCI CLI"),
               "https": ("az", "make setup-launch SKY_EXTRAS=azure")}


def _with_sky_tools() -> dict:
    """This environment, with SkyPilot's environment's tools (its cloud CLIs) first on PATH."""
    from opensem.launch.task import sky_python

    env = dict(os.environ)
    py = sky_python()
    if py:
        env["PATH"] = f"{Path(py).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def download_command(source: str, destination: Path, folder: bool) -> str:
    """SkyPilot's command that copies ``source`` on a store to ``destination`` here (its cloud_stores module)."""
    from opensem.launch.task import require_sky

    scheme = source.split("://", 1)[0]
    tool, how = STORE_TOOLS.get(scheme, (None, None))
    if tool is None:
        raise OpenSEMError(f"fetching from {scheme}:// is not supported here: copy {source} with your store's tool")
    if not shutil.which(tool, path=_with_sky_tools()["PATH"]):
        raise OpenSEMError(f"fetching from {scheme}:// needs `{tool}` on PATH: install {how}, or copy {source} by hand")
    code = ("import sys; from sky import cloud_stores as c; s = c.get_storage_from_path(sys.argv[1]); "
            "print(s.make_sync_dir_command(sys.argv[1], sys.argv[2]) if sys.argv[3] == 'dir' "
            "else s.make_sync_file_command(sys.argv[1], sys.argv[2]))")
    r = subprocess.run([str(require_sky()), "-c", code, source, str(destination), "dir" if folder else "file"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise OpenSEMError(f"SkyPilot has no download command for {source}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return r.stdout.strip()


def run_node(args: list[str], cwd: Path, env: dict, out, pid_file: Path) -> int:
    """One node's run, in its own process group (a preemption takes every process of it); its pid in ``pid_file``."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    try:
        return proc.wait()
    finally:
        pid_file.unlink(missing_ok=True)
