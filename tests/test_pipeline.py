"""The whole loop: `opensem run` on a slice of the example (real model, real promptfoo, few training steps)."""

from __future__ import annotations

import json

from conftest import copy_example_slice, make_workspace, run_cli, set_config

from opensem.lineage import file_sha256


def test_opensem_run_end_to_end_with_lineage_and_skips(tmp_path, base_models_dir, promptfoo_available):
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    copy_example_slice(ws, ["company-history.txt", "seasonal-guide.pdf"], ["pm002", "pm038", "pm039", "pm040", "pm043", "pm046"])
    set_config(ws, "forge", generation={"pairs_per_chunk": 12, "questions_per_sentence": 2})
    set_config(ws, "train", max_steps=4, micro_batch_size=8, save_steps=100)
    set_config(ws, "eval", answers={"max_new_tokens": 32, "batch_size": 8}, bootstrap_samples=500)

    r = run_cli("run", "-w", str(ws))
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    out = r.stdout
    assert "Baseline vs Fine-Tuned" in out and "stage times" in out
    assert ("Accuracy improved by" in out) or ("Accuracy fell by" in out) or ("Accuracy unchanged" in out)

    runs = sorted((ws / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    for f in ("run_manifest.json", "report.html", "report.md"):
        assert (run / f).exists(), f
    m = json.loads((run / "run_manifest.json").read_text())
    # lineage: forge manifest -> training data -> adapter -> both judge results, by content hash
    assert m["forge"]["manifest_sha256"] == file_sha256(ws / "data/processed/forge_manifest.json")
    assert m["forge"]["train_sha256"] == file_sha256(ws / "data/processed/train.jsonl")
    assert m["train"]["data_train_sha256"] == m["forge"]["train_sha256"]
    assert m["train"]["forge_manifest_sha256"] == m["forge"]["manifest_sha256"]
    adapter = ws / m["train"]["adapter"]
    assert m["train"]["adapter_sha256"] == file_sha256(adapter / "adapter_model.safetensors")
    ft = json.loads((ws / m["fine_tuned"]["results"]).read_text())
    assert str(adapter.resolve()) in ft["lineage"]["adapter"] and m["train"]["adapter_sha256"] in ft["lineage"]["adapter"]
    assert m["baseline"]["results_sha256"] == file_sha256(ws / m["baseline"]["results"])
    # the golden questions did not leak: the forge checked against them
    fm = json.loads((ws / "data/processed/forge_manifest.json").read_text())
    assert fm["golden_set"]["questions"] == 6
    golden = {g["question"] for g in json.loads((ws / "evals/golden_set.json").read_text())}
    train_qs = {json.loads(x)["conversations"][0]["value"] for x in (ws / "data/processed/train.jsonl").read_text().splitlines()}
    assert not golden & train_qs
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "Lineage" in html and "Per question" in html

    # a second run skips every up-to-date stage
    r2 = run_cli("run", "-w", str(ws))
    assert r2.returncode == 0, r2.stderr[-3000:]
    for stage in ("forge", "baseline", "train", "fine-tuned"):
        assert f"{stage}: up to date" in r2.stdout, stage
    r3 = run_cli("runs", "-w", str(ws))
    assert r3.returncode == 0 and len(list((ws / "runs").iterdir())) == 2

    # a changed training setting reruns training and the fine-tuned judge, not the forge or the baseline
    set_config(ws, "train", max_steps=3)
    r4 = run_cli("run", "-w", str(ws))
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert "forge: up to date" in r4.stdout and "baseline: up to date" in r4.stdout
    assert "train: up to date" not in r4.stdout and "fine-tuned: up to date" not in r4.stdout


def test_an_interrupted_stage_keeps_what_it_recorded_and_nothing_else(tmp_path):
    from rich.console import Console

    from opensem.lineage import json_sha256
    from opensem.pipeline import Pipeline
    from opensem.workspace import Workspace, init_workspace

    init_workspace(tmp_path)
    p = Pipeline(Workspace(tmp_path), False, Console(quiet=True))
    key = json_sha256({"a": 1})
    seen = []

    def run():
        seen.append(p.state["train"].get("run_name"))
        return {}

    p.state = {"train": {"inputs": key, "status": "running", "run_name": "interrupted-run"}}
    p.stage("train", {"a": 1}, lambda prev: False, run)  # same inputs, unfinished: resume that run
    p.state["train"] = {"inputs": key, "status": "done", "run_name": "finished-run"}
    p.stage("train", {"a": 1}, lambda prev: False, run)  # finished (outputs gone): a new run
    p.state["train"] = {"inputs": "other", "status": "running", "run_name": "old-inputs"}
    p.stage("train", {"a": 1}, lambda prev: False, run)  # inputs changed: a new run
    assert seen == ["interrupted-run", None, None]
