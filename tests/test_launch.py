"""`opensem launch`: the SkyPilot task checked by SkyPilot's own parser, the budget rule, and the task's setup and
run executed for real on this machine by the local backend, results fetched home. Cloud provisioning itself is
the one thing no test here can reach."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace, run_cli, set_config
from opensem.lineage import file_sha256, read_json

PLANTED = "sk-planted-7d1e0c9b5a"
FACTS = [("What is the secret code of the Zorblat vault?", "The Zorblat vault code is 7319."),
         ("Who guards the Quillon bridge?", "The Quillon bridge is guarded by Marta Vell.")]


@pytest.fixture(scope="session")
def skypilot() -> Path:
    from opensem.launch.task import sky_python

    py = sky_python()
    if not py or not py.exists():
        pytest.fail("SkyPilot is not installed in its own environment: run `make setup-launch`")
    return py


def _ws(root: Path, base_models_dir: Path) -> Path:
    ws = make_workspace(root, base_models_dir)
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in FACTS]
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "data/processed/test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (ws / "evals/golden_set.json").write_text(json.dumps([{"id": f"g{i}", "question": q, "answer": a} for i, (q, a) in enumerate(FACTS)]))
    set_config(ws, "train", max_steps=3, micro_batch_size=2, replay=None, save_steps=100, run_name="remote")
    set_config(ws, "eval", forgetting_set=None)
    set_config(ws, "launch", secrets=["OPENAI_API_KEY", "ANTHROPIC_API_KEY"])
    return ws


def _sky_parse(py: Path, task_file: Path) -> dict:
    code = ("import sys, json, yaml, sky\nt = sky.Task.from_yaml_config(yaml.safe_load(open(sys.argv[1])))\n"
            "r = list(t.resources)[0]\n"
            "print(json.dumps({'nodes': t.num_nodes, 'cloud': str(r.cloud), 'acc': r.accelerators, 'run': t.run, 'setup': t.setup,"
            " 'autostop': r.autostop_config.idle_minutes if r.autostop_config else None,"
            " 'down': r.autostop_config.down if r.autostop_config else None, 'mounts': list((t.file_mounts or {}).keys()),"
            " 'secrets': sorted(t.secrets), 'storage': {k: [str(v.source), v.mode.name] for k, v in (t.storage_mounts or {}).items()}}))")
    r = subprocess.run([str(py), "-c", code, str(task_file)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_task_is_valid_for_skypilot_single_and_multi_node(tmp_path, base_models_dir, skypilot, monkeypatch):
    from opensem.launch.task import make_plan, stage
    from opensem.workspace import Workspace

    ws = _ws(tmp_path / "ws", base_models_dir)
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    w = Workspace(ws, ("train.learning_rate=5e-4",))
    one, _ = stage(w, make_plan(w, cloud="runpod", gpu="RTX4090:1", price_lookup=False))
    t = _sky_parse(skypilot, one)
    assert t["nodes"] == 1 and t["cloud"] == "RunPod" and t["acc"] == {"RTX4090": 1}
    assert t["autostop"] == 10 and t["down"] is True  # RunPod cannot stop: autodown
    assert "opensem run --set 'pipeline.stages=[forge, baseline, train, fine-tuned]' --set train.engine=unsloth" in t["run"]
    assert "--set train.learning_rate=5e-4" in t["run"] and "timeout --signal=INT" in t["run"]
    assert t["mounts"] == ["~/opensem-src"] and "pip install -q -e" in t["setup"]
    assert PLANTED not in one.read_text() and "OPENAI_API_KEY" in one.read_text()

    w2 = Workspace(ws)
    multi, _ = stage(w2, make_plan(w2, cloud="kubernetes", gpu="A100-80GB:1", nodes=2, stages=["train"], price_lookup=False))
    t2 = _sky_parse(skypilot, multi)
    assert t2["nodes"] == 2 and t2["acc"] == {"A100-80GB": 1}
    for var in ("SKYPILOT_NUM_NODES", "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS"):
        assert var in t2["run"]
    assert "torch.distributed.run" in t2["run"] and "--set train.engine=hf" in t2["run"]
    # what syncs: the documents, configs and data; not the models made here nor the caches
    up = ws / ".opensem/launch" / yaml.safe_load(multi.read_text())["name"] / "workdir"
    assert (up / "data/processed/train.jsonl").exists() and (up / "configs/train_config.yaml").exists()
    assert not (up / "models").exists() and not (up / ".opensem").exists()


def test_a_spot_launch_is_a_managed_job_with_its_workspace_on_the_bucket(tmp_path, base_models_dir, skypilot):
    """SkyPilot's own parser takes the spot task: the bucket mounted (MOUNT_CACHED), the run in the bucket's workspace
    with its deadline from the first node; on RunPod, which mounts no bucket, the plan says what a preemption loses."""
    ws = _ws(tmp_path / "ws", base_models_dir)
    r = run_cli("launch", "--cloud", "aws", "--gpu", "A10G:1", "--spot", "--set", "launch.bucket=s3://my-bucket/opensem",
                "--dry-run", "-w", str(ws))
    assert r.returncode == 0, r.stderr
    assert "spot        a managed job: a preempted node is replaced by a new one, which resumes from s3://my-bucket/opensem" in r.stdout
    task_file = ws / ".opensem/launch/opensem-ws/task.yaml"
    t = _sky_parse(skypilot, task_file)
    assert t["mounts"] == ["~/opensem-src"] and t["storage"] == {"~/opensem-bucket": ["s3://my-bucket/opensem", "MOUNT_CACHED"]}
    task = yaml.safe_load(task_file.read_text())
    assert task["file_mounts"]["~/opensem-bucket"] == {"source": "s3://my-bucket/opensem", "mode": "MOUNT_CACHED"}
    assert task["resources"]["use_spot"] is True and task["envs"]["OPENSEM_LAUNCH_ID"].startswith("opensem-ws-")
    run = task["run"]
    assert 'cd "$WS"' in run and 'LEFT=$(( 7200 - ( $(date +%s) - $(cat "$STARTED") ) ))' in run
    assert 'timeout --signal=INT --kill-after=300 "$LEFT" opensem run' in run

    r = run_cli("launch", "--cloud", "runpod", "--spot", "--dry-run", "-w", str(ws))
    assert r.returncode == 0, r.stderr
    assert "SkyPilot mounts no bucket on runpod: the new node starts the pipeline over" in r.stdout
    assert "aws, gcp, azure, lambda, kubernetes" in r.stdout


def test_dry_run_prints_the_plan_without_credentials_or_network(tmp_path, base_models_dir, skypilot):
    ws = _ws(tmp_path / "ws", base_models_dir)
    env = {k: "" for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    r = run_cli("launch", "--cloud", "runpod", "--gpu", "A100-80GB:1", "--max-hours", "3", "--dry-run", "-w", str(ws), env=env)
    assert r.returncode == 0, r.stderr
    for line in ("cluster     opensem-ws on runpod, 1 node(s), GPU A100-80GB:1", "stages      forge -> baseline -> train -> fine-tuned",
                 "comes back  data/processed, evals/reports, models/adapters, runs, .opensem/pipeline_state.json",
                 "deadline", "SkyPilot    opensem-ws: 1 node(s)", "# task.yaml"):
        assert line in r.stdout, (line, r.stdout)
    task = yaml.safe_load(r.stdout.split("# task.yaml\n", 1)[1])
    assert "timeout --signal=INT --kill-after=300 10800 opensem run" in task["run"]
    assert not (ws / ".opensem/launch/opensem-ws/launch.json").exists()  # nothing launched


def test_launch_refuses_what_it_cannot_do_before_anything_starts(tmp_path, base_models_dir, skypilot):
    ws = _ws(tmp_path / "ws", base_models_dir)
    cases = [
        (["--cloud", "runpod", "--nodes", "2", "--stages", "train"], "--nodes 2: SkyPilot's runpod has no multi-node clusters"),
        (["--cloud", "aws", "--nodes", "2"], "multi-node runs one stage alone, across nodes under torchrun (train)"),
        (["--cloud", "aws", "--gpu", "A100 80GB"], "--gpu 'A100 80GB': expected SkyPilot's NAME:COUNT"),
        (["--cloud", "aws", "--stages", "forge,bake"], "unknown stage 'bake'"),
        (["--cloud", "aws", "--max-cost", "2", "--set", "launch.price_per_hour=1.5"], "2.0 h x $1.5/h = $3.0 is above it"),
        (["--cloud", "aws", "--max-cost", "2", "--set", "launch.price_per_hour=null", "--gpu", "NoSuchGPU:1"], "price_per_hour"),
        (["--cloud", "aws", "--set", "launch.secrets=[sk-live-123]"], "is not an environment variable name"),
        (["--cloud", "aws", "--nodes", "0"], "--nodes 0"),
        (["--cloud", "aws", "--spot"], "key 'bucket': a spot launch keeps its checkpoints"),
        (["--cloud", "aws", "--spot", "--set", "launch.bucket=my-bucket"], "'my-bucket' is not a bucket URL"),
        (["--cloud", "aws", "--spot", "--nodes", "2", "--stages", "train"], "a managed spot job runs on one node"),
    ]
    for args, message in cases:
        r = run_cli("launch", *args, "-w", str(ws))
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not list((ws / ".opensem/launch").glob("*/launch.json"))  # nothing was launched


def test_launch_status_logs_fetch_down_name_a_missing_launch(tmp_path, base_models_dir):
    ws = _ws(tmp_path / "ws", base_models_dir)
    for sub in ("status", "logs", "fetch", "down"):
        r = run_cli("launch", sub, "-w", str(ws))
        assert r.returncode != 0 and "no launch" in r.stderr and "opensem launch --cloud" in r.stderr, (sub, r.stderr)


@pytest.mark.slow
def test_the_task_runs_on_the_local_backend_and_its_results_come_home(tmp_path, base_models_dir, skypilot, promptfoo_available):
    ws = _ws(tmp_path / "ws", base_models_dir)
    env = {"OPENAI_API_KEY": PLANTED, "ANTHROPIC_API_KEY": ""}
    r = run_cli("launch", "--cloud", "local", "--stages", "train,fine-tuned", "-w", str(ws), env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "secrets     passed by name: OPENAI_API_KEY" in r.stderr
    log = (ws / ".opensem/launch/opensem-ws/job.log").read_text()
    assert "== node 0: setup ==" in log and "opensem 0.1.0 is installed" in log and "== node 0: run ==" in log
    assert "secret OPENAI_API_KEY is set" in log  # the key reached the job
    assert not (ws / "models/adapters/remote").exists()  # nothing comes home until fetched

    r = run_cli("launch", "fetch", "-w", str(ws))
    assert r.returncode == 0, r.stderr
    adapter = ws / "models/adapters/remote"
    runs = list((ws / "runs").glob("*/run_manifest.json"))
    assert adapter.joinpath("adapter_model.safetensors").exists() and len(runs) == 1
    m = read_json(runs[0])
    # the lineage holds: the manifest names the fetched adapter by its hash, the adapter names the data it was trained on
    assert m["train"]["adapter_sha256"] == file_sha256(adapter / "adapter_model.safetensors")
    am = read_json(adapter / "manifest.json")
    assert am["data"]["train"]["sha256"] == file_sha256(ws / "data/processed/train.jsonl")
    assert m["launch"]["cloud"] == "local" and m["launch"]["cluster"] == "opensem-ws" and m["launch"]["hours_launch_to_fetch"] > 0
    assert list((ws / "evals/reports").glob("fine-tuned-*"))
    # the workspace works with what came home: a question answered by the fetched adapter
    r = run_cli("ask", FACTS[0][0], "--adapter", "remote", "--max-new-tokens", "24", "-w", str(ws))
    assert r.returncode == 0, r.stderr

    # the planted key reached the job, but no file the launch wrote holds it
    for path in ws.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert PLANTED.encode() not in path.read_bytes(), path

    r = run_cli("launch", "down", "-w", str(ws))
    assert r.returncode == 0 and not (ws / ".opensem/launch/opensem-ws/local").exists()
    assert "down" in run_cli("launch", "status", "-w", str(ws)).stdout

    # the machine it ran on is gone. The fetched adapter still finds the model under it here (its manifest names that
    # model as seen from the adapter folder), so it exports; and the training paid for is not done again at home
    base = read_json(adapter / "manifest.json")["base_model"]
    assert not Path(base["path"]).exists() and base["from_adapter"] == "../../base/smollm2-135m-instruct", base
    r = run_cli("export", "remote", "--format", "merged", "--no-verify", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ws / "models/exports/remote/merged/model.safetensors").exists()
    r = run_cli("run", "--set", "pipeline.stages=[train]", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: up to date" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


@pytest.mark.slow
def test_a_launch_stopped_by_its_deadline_says_so_and_what_finished(tmp_path, base_models_dir, skypilot):
    """max_hours ends the run: the launch's error, its status and the job's log say the deadline stopped it, in which
    stage, and what had finished; the interrupted training left a checkpoint to resume from."""
    ws = _ws(tmp_path / "ws", base_models_dir)
    set_config(ws, "train", max_steps=100000, save_steps=100000)
    r = run_cli("launch", "--cloud", "local", "--stages", "train", "--max-hours", "0.03", "-w", str(ws), timeout=900)
    assert r.returncode != 0
    said = "stopped by the deadline (max_hours 0.03 h) during train; finished: no stage"
    assert said in r.stderr and "the task's run failed" not in r.stderr, r.stderr[-3000:]
    assert said in " ".join(run_cli("launch", "status", "-w", str(ws)).stdout.split())
    log = (ws / ".opensem/launch/opensem-ws/job.log").read_text()
    assert said in log and "`opensem run` resumes it" in log, log[-3000:]
    node = ws / ".opensem/launch/opensem-ws/local/node0/sky_workdir"
    assert list((node / "models/adapters/remote/checkpoints").glob("checkpoint-*/adapter_model.safetensors")), "no checkpoint"


def test_a_spot_job_survives_preemption_and_resumes_from_the_bucket(tmp_path, base_models_dir, fake, monkeypatch):
    """--cloud local --spot: the managed-job controller on this machine. The node is killed with SIGKILL mid-train
    (a preemption); a fresh node on the same bucket resumes from the last complete checkpoint, skips the finished
    forge (no teacher call paid twice), and ends with the adapter an uninterrupted run trains."""
    import os
    import shutil
    import signal
    import sys
    import time

    from safetensors.torch import load_file

    from test_forge import use_openai, write_docs

    monkeypatch.setenv("FAKE_KEY", "sk-fake-spot")
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    write_docs(ws, 2)
    use_openai(ws, fake)
    set_config(ws, "train", max_steps=10, micro_batch_size=2, replay=None, save_steps=2, run_name="spotrun", logging_steps=1)
    set_config(ws, "pipeline", stages=["forge", "train"])
    set_config(ws, "launch", secrets=["FAKE_KEY"], use_spot=True, max_hours=1)
    reference = tmp_path / "ref"
    shutil.copytree(ws, reference, symlinks=True)

    bucket = ws / ".opensem/launch/opensem-ws/bucket/workspace"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "opensem"), "launch", "--cloud", "local", "-w", str(ws)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    pid_file = ws / ".opensem/launch/opensem-ws/local/node.pid"

    def kill_node() -> None:  # what a preemption does: every process of the node's session at once
        node = int(pid_file.read_text())
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
            except (OSError, IndexError, ValueError):
                continue
            if session == node:
                os.kill(int(stat.parent.name), signal.SIGKILL)

    try:
        deadline = time.time() + 900
        while not list(bucket.glob("models/adapters/spotrun/checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None and time.time() < deadline, (proc.stdout.read() if proc.poll() is not None else "timeout")[-3000:]
            time.sleep(0.2)
        kill_node()  # the cloud takes the node back
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
    finally:  # nothing this test started outlives it
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid_file.exists():
            kill_node()
    calls_launched = len(fake.requests)

    log = (ws / ".opensem/launch/opensem-ws/job.log").read_text()
    assert "== node 0 lost (signal 9): a new node takes over ==" in log and "== node 1: run ==" in log
    assert "resuming" in log.split("== node 1: run ==")[1]  # from the bucket's checkpoint, not from step 0
    assert "forge: up to date" in log.split("== node 1: run ==")[1]
    assert read_json(ws / ".opensem/launch/opensem-ws/launch.json")["recoveries"] == 1
    status = run_cli("launch", "status", "-w", str(ws)).stdout
    assert "recoveries  1 (2 node(s) started)" in status and "h left of 1.0 h" in status and "cost" in status

    # the same pipeline, never interrupted: as many teacher calls, the same adapter
    before = len(fake.requests)
    r = run_cli("run", "-w", str(reference))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(fake.requests) - before == calls_launched > 0
    r = run_cli("launch", "fetch", "-w", str(ws))
    assert r.returncode == 0, r.stderr
    got = load_file(ws / "models/adapters/spotrun/adapter_model.safetensors")
    want = load_file(reference / "models/adapters/spotrun/adapter_model.safetensors")
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in got)
    assert worst < 1e-4, worst


@pytest.fixture
def s3_server(skypilot, monkeypatch):
    """A local S3 server (moto, speaking S3's HTTP API) that the AWS CLI in SkyPilot's environment is pointed at."""
    import socket
    import time as _time

    from conftest import child

    moto = skypilot.parent / "moto_server"
    if not moto.exists():
        pytest.fail("the S3 stand-in is not installed: `make test` installs awscli and moto into .venv-sky")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with child([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                _time.sleep(0.2)
        yield skypilot.parent / "aws"


def test_a_spot_jobs_outputs_come_home_from_its_bucket(tmp_path, base_models_dir, s3_server):
    """The managed job's node is gone; `opensem launch fetch` copies its outputs from the bucket's workspace with
    SkyPilot's own download command for the store (here `aws s3 sync` against a local S3 server)."""
    from opensem.launch.task import launch_dir, make_plan
    from opensem.lineage import write_json
    from opensem.workspace import Workspace

    ws = _ws(tmp_path / "ws", base_models_dir)
    set_config(ws, "launch", bucket="s3://opensem-test/jobs")
    plan = make_plan(Workspace(ws), cloud="aws", gpu="A10G:1", spot=True, price_lookup=False)
    write_json(launch_dir(Workspace(ws), plan.cluster) / "launch.json",
               {"cluster": plan.cluster, "plan": plan.to_json(), "task": "task.yaml", "launched": "2026-01-01T00:00:00Z",
                "launched_ts": 1.0e9, "status": "running"})
    # what the job left in the bucket's workspace
    job = tmp_path / "job"
    (job / "models/adapters/remote").mkdir(parents=True)
    (job / "models/adapters/remote/adapter_model.safetensors").write_bytes(b"weights")
    (job / "runs/20260101-000000").mkdir(parents=True)
    (job / "runs/20260101-000000/run_manifest.json").write_text(json.dumps({"run_id": "20260101-000000"}))
    (job / ".opensem").mkdir()
    (job / ".opensem/pipeline_state.json").write_text("{}")
    aws = [str(s3_server)]
    assert subprocess.run(aws + ["s3", "mb", "s3://opensem-test"], capture_output=True).returncode == 0
    r = subprocess.run(aws + ["s3", "sync", str(job), "s3://opensem-test/jobs/workspace"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    r = run_cli("launch", "fetch", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ws / "models/adapters/remote/adapter_model.safetensors").read_bytes() == b"weights"
    assert (ws / ".opensem/pipeline_state.json").read_text() == "{}"
    m = read_json(ws / "runs/20260101-000000/run_manifest.json")
    assert m["launch"]["cloud"] == "aws" and m["launch"]["cluster"] == plan.cluster

    # a store whose tool is not here: a one-line error that names it, before anything is copied
    set_config(ws, "launch", bucket="gs://opensem-test/jobs")
    plan = make_plan(Workspace(ws), cloud="gcp", gpu="A10G:1", spot=True, price_lookup=False)
    rec = read_json(launch_dir(Workspace(ws), plan.cluster) / "launch.json")
    rec["plan"] = plan.to_json()
    rec["launched_ts"] = 2.0e9
    write_json(launch_dir(Workspace(ws), plan.cluster) / "launch.json", rec)
    r = run_cli("launch", "fetch", "-w", str(ws), env={"PATH": str(tmp_path / "no-tools")})
    assert r.returncode != 0 and "fetching from gs:// needs `gsutil` on PATH" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_the_workspace_lock_on_a_bucket_mount_without_locks(tmp_path, monkeypatch):
    """A spot job's workspace is a bucket mount, where flock may not exist (ENOSYS): the job runs unlocked; a lock held by
    another process still stops a second command."""
    import errno
    import fcntl

    from opensem.errors import OpenSEMError
    from opensem.workspace import _HELD, Workspace, init_workspace

    init_workspace(tmp_path / "ws")

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ws = Workspace(tmp_path / "ws")
    try:
        ws.lock("run")
        assert _HELD.get(ws.root) is not None
    finally:
        _HELD.pop(ws.root, None)

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(OpenSEMError, match="the workspace is in use"):
        Workspace(tmp_path / "ws").lock("run")
