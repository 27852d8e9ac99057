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
            " 'secrets': sorted(t.secrets)}))")
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
