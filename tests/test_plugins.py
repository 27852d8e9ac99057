"""Extensions of one's own: a judge scorer and a pipeline stage with its own config section, from a module in
tests/ (plugin_fixtures.py), registered through entry points as a separate package would, or named by module path.
Each works end to end, and nothing in src/ names them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import REPO, make_workspace, run_cli, set_config

from opensem.text import normalize


def plugin_env(tmp_path: Path, groups: dict[str, dict[str, str]]) -> dict:
    """A package's entry points, as pip would install them: a dist-info folder on PYTHONPATH."""
    site = tmp_path / "site"
    dist = site / "opensem_test_plugins-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: opensem-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                                                   for g, eps in groups.items()))
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def latest_run(ws: Path) -> dict:
    return json.loads(sorted((ws / "runs").glob("*/run_manifest.json"))[-1].read_text())


def test_a_stage_of_ones_own_runs_with_its_own_config_section_and_set(workspace, tmp_path):
    env = plugin_env(tmp_path, {"opensem.stages": {"hello": "plugin_fixtures:HelloStage"}})
    (workspace / "configs/hello_config.yaml").write_text("greeting: hi\n")
    doctor = run_cli("doctor", "-w", str(workspace), env=env)
    assert doctor.returncode == 0 and "hello" in doctor.stdout, doctor.stdout + doctor.stderr

    r = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[hello]", "--set", "hello.times=3", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (workspace / "data/hello.txt").read_text() == "hi hi hi\n"
    m = latest_run(workspace)
    assert m["pipeline"] == ["hello"] and m["hello"]["greeting"] == "hi" and m["hello"]["times"] == 3
    assert m["hello"]["artifacts"]["greeting"]["path"] == "data/hello.txt"

    # its report section: a run that judged nothing still gets the stages' own sections in report.md
    report = next((workspace / "runs").glob("*/report.md")).read_text()
    assert "## Hello" in report and "| greeting | hi |" in report and "| times | 3 |" in report, report
    # its own command, which takes --set of its own section
    said = run_cli("hello", "-w", str(workspace), "--set", "hello.greeting=salut", env=env)
    assert said.returncode == 0 and said.stdout.strip() == "salut", said.stdout + said.stderr
    assert "hello" in run_cli("--help", env=env).stdout

    runs = run_cli("runs", "-w", str(workspace), env=env | {"COLUMNS": "200"})
    assert runs.returncode == 0 and "greeting" in runs.stdout and "hi x3" in runs.stdout, runs.stdout + runs.stderr

    again = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[hello]", "--set", "hello.times=3", env=env)
    assert again.returncode == 0 and "hello: up to date" in again.stdout + again.stderr
    assert json.loads((workspace / "data/hello_runs.json").read_text())["runs"] == 1

    # the same stage named by module path; a --set of its own section is a new input, so it runs again
    r = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[plugin_fixtures:HelloStage]",
                "--set", "hello.greeting=hey", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (workspace / "data/hello.txt").read_text() == "hey\n"
    assert json.loads((workspace / "data/hello_runs.json").read_text())["runs"] == 2

    # a bad value in its section: one line naming the flag and key, before any stage (the forge, first) does work
    bad = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[forge,hello]", "--set", "hello.times=0", env=env)
    assert bad.returncode == 2, bad.stderr[-2000:]
    line = bad.stderr.strip().splitlines()[-1]
    assert "--set hello.times=0" in line and "'times'" in line and "greater than or equal to 1" in line, line
    assert not (workspace / "data/processed/forge_manifest.json").exists()
    (workspace / "configs/hello_config.yaml").write_text("greting: hi\n")
    bad = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[hello]", env=env)
    assert bad.returncode == 2 and "configs/hello_config.yaml: unknown key 'greting'" in bad.stderr, bad.stderr[-2000:]

    # a section that no stage of this workspace declares
    bad = run_cli("run", "-w", str(workspace), "--set", "nosuch.key=1", env=env)
    assert bad.returncode == 2 and "--set 'nosuch.key=1': the key must start with one of" in bad.stderr, bad.stderr[-2000:]


def test_a_stage_takes_what_it_needs_from_this_run_or_the_last_one_finished_here(workspace, tmp_path):
    """A declared need: the result of a stage before it in the run, else the last finished one in the workspace (from
    `opensem run` or `opensem stage`), never an older file picked from disk; none is a one-line error before any work."""
    env = plugin_env(tmp_path, {"opensem.stages": {"hello": "plugin_fixtures:HelloStage", "echo": "plugin_fixtures:EchoStage"}})
    (workspace / "data/raw/pump.md").write_text("# Pump\n\nThe Halden H-40 pump runs at a maximum pressure of 12 bar.\n")
    (workspace / "data/hello.txt").write_text("an old file\n")  # on disk, but no stage's finished result
    bad = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[forge,echo]", env=env)
    assert bad.returncode == 2, bad.stderr[-2000:]
    said = " ".join(bad.stderr.split())
    assert "'echo' needs the result of 'hello'" in said and "`opensem stage hello`" in said, said
    assert not (workspace / "data/processed/forge_manifest.json").exists() and not (workspace / "data/echo.txt").exists()

    one = run_cli("stage", "hello", "-w", str(workspace), "--set", "hello.greeting=ahoy", env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    r = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[echo]", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (workspace / "data/echo.txt").read_text() == "AHOY\n"
    again = run_cli("stage", "hello", "-w", str(workspace), "--set", "hello.greeting=ahoy", env=env)
    assert "hello: up to date" in again.stdout + again.stderr  # `opensem stage` skips as `opensem run` does

    # in the same run, the stage before it is used
    r = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[hello,echo]", "--set", "hello.greeting=hoi", env=env)
    assert r.returncode == 0 and (workspace / "data/echo.txt").read_text() == "HOI\n", r.stderr[-2000:]

    # its files changed since it finished: that result is no longer there to use
    (workspace / "data/hello.txt").write_text("edited by hand\n")
    bad = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[echo]", env=env)
    assert bad.returncode == 2 and "'echo' needs the result of 'hello'" in " ".join(bad.stderr.split()), bad.stderr[-2000:]


def test_what_comes_home_from_a_rented_gpu_is_what_the_stages_declare(workspace):
    from opensem.launch.task import fetch_list
    from opensem.workspace import Workspace

    ws = Workspace(workspace)
    assert fetch_list(ws, ["plugin_fixtures:HelloStage", "train"]) == ["data/hello.txt", "models/adapters", "runs",
                                                                       ".opensem/pipeline_state.json"]
    set_config(workspace, "train", output_dir="models/mine")  # a stage's folder as configured, not as built in
    assert fetch_list(Workspace(workspace), ["forge", "train"])[:2] == ["data/processed", "models/mine"]


def test_every_config_a_stage_reads_is_checked_before_the_first_stage_works(workspace):
    """A bad export_config.yaml used to fail after training; now it fails before the forge starts."""
    (workspace / "data/raw/pump.md").write_text("# Pump\n\nThe Halden H-40 pump runs at a maximum pressure of 12 bar.\n")
    (workspace / "configs/export_config.yaml").write_text("formats: [zip]\n")
    r = run_cli("run", "-w", str(workspace), "--set", "pipeline.stages=[forge,train,export]")
    assert r.returncode == 2 and "configs/export_config.yaml: key 'formats" in r.stderr, r.stderr[-2000:]
    assert not (workspace / "data/processed/forge_manifest.json").exists()


def test_a_scorer_of_ones_own_grades_in_the_judge_table_and_calibration(tmp_path, base_models_dir, promptfoo_available):
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    golden = [{"question": "What is the capital of France?", "answer": "Paris"},
              {"question": "What colour is the Tessaly lantern?", "answer": "The Tessaly lantern is teal."},
              {"question": "How many legs does a spider have?", "answer": "eight"}]
    (ws / "evals/golden_set.json").write_text(json.dumps(golden))
    set_config(ws, "eval", answers={"max_new_tokens": 16, "batch_size": 8}, forgetting_set=None, bootstrap_samples=200)
    env = plugin_env(tmp_path, {"opensem.scorers": {"exact": "plugin_fixtures:ExactScorer"}})

    r = run_cli("judge", "--mode", "baseline", "-w", str(ws), "--set", "eval.judge.provider=exact", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(next((ws / "evals/reports").rglob("results.json")).read_text())
    assert results["judge"] == "exact-match scorer (test plugin)" and results["lineage"]["judge"] == results["judge"]
    for item in results["items"]:  # graded through promptfoo by the plugin: 5 exactly when the answer holds the golden one
        assert item["score"] == (5.0 if normalize(item["golden"]) in normalize(item["output"]) else 1.0), item
    report = next((ws / "evals/reports").rglob("report.md")).read_text()
    assert "exact-match scorer (test plugin)" in report

    cal = run_cli("judge", "--calibrate", "-w", str(ws), "--set", "eval.judge.provider=plugin_fixtures:ExactScorer", env=env)
    assert cal.returncode == 0, cal.stderr[-2000:]
    flat = " ".join(cal.stdout.split())
    assert "exact-match scorer (test plugin)" in flat and "offline reference scorer" in flat, cal.stdout

    bad = run_cli("judge", "--mode", "baseline", "-w", str(ws), "--set", "eval.judge.provider=exactt", env=env)
    assert bad.returncode == 2 and "unknown provider 'exactt'" in bad.stderr and "or a scorer: offline, exact" in bad.stderr, bad.stderr


def test_an_export_format_of_ones_own_exports_and_verifies(tmp_path, base_models_dir, memorised_adapter):
    import shutil

    from opensem.lineage import file_sha256

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    shutil.copytree(memorised_adapter, ws / "models/adapters/mem", ignore=shutil.ignore_patterns("merged"))
    golden = [{"question": "What is the secret code of the Zorblat vault?", "answer": "The Zorblat vault code is 7319."},
              {"question": "What colour is the Tessaly lantern?", "answer": "The Tessaly lantern is teal."}]
    (ws / "evals/golden_set.json").write_text(json.dumps(golden))
    env = plugin_env(tmp_path, {"opensem.exports": {"adapter-copy": "plugin_fixtures:AdapterCopy"}})
    doctor = run_cli("doctor", "-w", str(ws), env=env)
    assert doctor.returncode == 0 and "adapter-copy" in doctor.stdout, doctor.stdout + doctor.stderr

    for fmt in ("adapter-copy", "plugin_fixtures:AdapterCopy"):
        r = run_cli("export", "mem", "--format", fmt, "-w", str(ws), env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        m = json.loads((ws / "models/exports/mem/export_manifest.json").read_text())
        entry = m["files"]["adapter-copy"]
        assert entry["path"] == "models/exports/mem/adapter/adapter_model.safetensors"
        assert entry["sha256"] == file_sha256(ws / "models/adapters/mem/adapter_model.safetensors")
        assert entry["check"]["passed"] and entry["check"]["exact"] == 1.0  # the copy answers as the evaluated model
        assert set(m["files"]) == {"adapter-copy"} and m["source"]["run_name"] == "mem"
    assert "adapter-copy" in r.stdout

    bad = run_cli("export", "mem", "--format", "adapter-kopy", "-w", str(ws), env=env)
    assert bad.returncode == 2 and "--format 'adapter-kopy': use one of merged, gguf, ollama, lora-gguf, retrieval, adapter-copy" in bad.stderr
    (ws / "configs/export_config.yaml").write_text("formats: [adapter-copy]\n")
    r = run_cli("export", "mem", "-w", str(ws), env=env)  # named in export_config.yaml
    assert r.returncode == 0, r.stderr[-2000:]

