"""The whole loop: `opensem run` on a slice of the example (real model, real promptfoo, few training steps)."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert any(h in out for h in ("Accuracy improved by", "Accuracy fell by", "Mean score improved", "Mean score fell", "No significant change"))

    runs = sorted((ws / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    for f in ("run_manifest.json", "report.html", "report.md"):
        assert (run / f).exists(), f
    m = json.loads((run / "run_manifest.json").read_text())
    # the closing line names a change an improvement or a loss only when its paired CI excludes zero
    from opensem.judge.report import significance

    words = {"up": ("Accuracy improved", "Mean score improved"), "down": ("Accuracy fell", "Mean score fell"),
             "none": ("No significant change",)}[significance(m["comparison"])]
    assert m["headline"].startswith(words)
    # the direction four steps can move: the tuned model answers in the trained style, short single-sentence
    # answers (17 -> 11 words here). Four steps on six golden questions are too few to move the 1-5 score, and
    # token F1 (0.084 -> 0.099 here) moves too little to assert; `make demo` shows the gain.
    b, f = m["baseline"]["summary"], m["fine_tuned"]["summary"]
    assert f["mean_length_words"] < 0.85 * b["mean_length_words"], (b, f)
    assert m["pipeline"] == ["forge", "baseline", "train", "fine-tuned"]
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
    # by default both models also answer with retrieval, and the judge records which of the four rows to ship
    assert m["fine_tuned"]["retrieval"]["recall_at_k"] is not None and "baseline_retrieval__baseline" in ft["retrieval_comparisons"]
    assert m["recommended"]["row"] in ("baseline", "baseline_retrieval", "fine_tuned", "fine_tuned_retrieval")
    assert m["recommended"]["summary"]["n"] == 6 and m["recommendation"].startswith("On your data: ")
    # why it misses: the fine-tuned model also answered a sample of its own training questions, scored the same way
    own = ft["own_questions"]
    n_train = len((ws / "data/processed/train.jsonl").read_text().splitlines())
    assert own["summary"]["n"] == min(24, n_train) and own["items"]
    assert {it["question"] for it in own["items"]} <= train_qs and m["diagnosis"].startswith("Why it misses: ")
    assert m["diagnosis"] in (run / "report.md").read_text() and "Fine-tune or retrieve?" in html

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

    # any list of stages with a judged one writes its report: without the forge and the baseline here (the
    # comparison's baseline is the earlier run's), and a baseline alone gets its Markdown report
    (ws / "configs/pipeline_config.yaml").write_text("stages: [train, fine-tuned]\n")
    r5 = run_cli("run", "-w", str(ws))
    assert r5.returncode == 0, r5.stderr[-3000:]
    last = sorted((ws / "runs").iterdir())[-1]
    html5 = (last / "report.html").read_text()
    assert "Per question" in html5 and "data:image/png;base64," in html5 and "<h2>Forge</h2>" not in html5
    assert "compared with" in html5 and (last / "report.md").exists()  # the earlier run's baseline, in the lineage
    assert "<h2>Training</h2>" in html5 and "## Training" in (last / "report.md").read_text()  # the train stage's own section
    (ws / "configs/pipeline_config.yaml").write_text("stages: [baseline]\n")
    r6 = run_cli("run", "-w", str(ws))
    assert r6.returncode == 0, r6.stderr[-3000:]
    last = sorted((ws / "runs").iterdir())[-1]
    assert "Baseline" in (last / "report.md").read_text() and not (last / "report.html").exists()


def test_an_interrupted_stage_keeps_what_it_recorded_and_nothing_else(tmp_path):
    from rich.console import Console

    from opensem.lineage import json_sha256
    from opensem.pipeline import Pipeline
    from opensem.stages import StageResult
    from opensem.workspace import Workspace, init_workspace

    init_workspace(tmp_path)
    p = Pipeline(Workspace(tmp_path), False, Console(quiet=True))
    key = json_sha256({"a": 1})
    seen = []

    def run(record):
        seen.append(record.get("run_name"))
        return StageResult("train", {})

    p.state = {"train": {"inputs": key, "status": "running", "run_name": "interrupted-run"}}
    p.stage("train", {"a": 1}, run)  # same inputs, unfinished: resume that run
    p.state["train"] = {"inputs": key, "status": "failed", "run_name": "failed-run", "error": "boom"}
    p.stage("train", {"a": 1}, run)  # same inputs, failed: its record is kept too (the checkpoint may resume)
    p.state["train"] = {"inputs": key, "status": "done", "run_name": "finished-run",
                        "result": {"stage": "train", "artifacts": {"adapter": {"path": "gone.safetensors", "sha256": "x"}}}}
    p.stage("train", {"a": 1}, run)  # finished, but its outputs are gone: a new run
    p.state["train"] = {"inputs": "other", "status": "running", "run_name": "old-inputs"}
    p.stage("train", {"a": 1}, run)  # inputs changed: a new run
    p.state["train"] = {"inputs": key, "status": "done", "run_name": "v0.1-record"}
    p.stage("train", {"a": 1}, run)  # a record written before typed results: rerun, never a crash
    assert seen == ["interrupted-run", "failed-run", None, None, None]


def test_declared_stages_run_in_order_and_a_stage_of_your_own_plugs_in(tmp_path, monkeypatch):
    """A stage is one module: here a test module's stage class, named in pipeline_config.yaml as module:attribute."""
    from rich.console import Console

    from opensem.pipeline import run_pipeline
    from opensem.workspace import Workspace, init_workspace

    init_workspace(tmp_path)
    (tmp_path / "data/raw/notes.txt").write_text("The pump runs at 12 bar.")
    (tmp_path / "configs/pipeline_config.yaml").write_text("stages: [stage_fixtures:CountWords, stage_fixtures:Shout]\n")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import stage_fixtures

    stage_fixtures.CALLS.clear()
    m = run_pipeline(Workspace(tmp_path), console=Console(quiet=True))
    assert stage_fixtures.CALLS == ["count-words", "shout"]
    assert m["pipeline"] == ["count-words", "shout"] and m["count_words"]["words"] == 6
    assert (tmp_path / "out/SHOUT.txt").read_text() == "6 WORDS"
    # unchanged inputs: both skipped; a changed document reruns both, in order
    run_pipeline(Workspace(tmp_path), console=Console(quiet=True))
    assert stage_fixtures.CALLS == ["count-words", "shout"]
    (tmp_path / "data/raw/notes.txt").write_text("The pump runs at 14 bar today.")
    m = run_pipeline(Workspace(tmp_path), console=Console(quiet=True))
    assert stage_fixtures.CALLS == ["count-words", "shout"] * 2 and m["count_words"]["words"] == 7
    # a deleted output reruns only the stage that made it
    (tmp_path / "out/SHOUT.txt").unlink()
    run_pipeline(Workspace(tmp_path), console=Console(quiet=True))
    assert stage_fixtures.CALLS[-1] == "shout" and len(stage_fixtures.CALLS) == 5


def test_unknown_stage_is_a_one_line_error(tmp_path):
    from opensem.workspace import init_workspace

    init_workspace(tmp_path)
    (tmp_path / "configs/pipeline_config.yaml").write_text("stages: [forge, polish]\n")
    r = run_cli("run", "-w", str(tmp_path))
    assert r.returncode == 2 and "unknown stage 'polish': use one of forge, baseline, fine-tuned, cpt, train, pairs, preference, preferred, export" in " ".join(r.stderr.split())


def test_a_corrupt_record_is_a_one_line_error_naming_the_file(tmp_path):
    from opensem.errors import OpenSEMError
    from opensem.lineage import read_json
    from opensem.workspace import init_workspace

    init_workspace(tmp_path)
    (tmp_path / "evals/golden_set.json").write_text('[{"question": "q?", "answer": "a"}]')
    state = tmp_path / ".opensem/pipeline_state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"forge": {"inputs": "sha256:')  # torn mid-write by an old crash, or edited by hand
    r = run_cli("run", "-w", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pipeline_state.json: corrupt JSON (line 1" in " ".join(r.stderr.split())
    run = tmp_path / "runs/20260101-000000"
    run.mkdir(parents=True)
    (run / "run_manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    r = run_cli("runs", "-w", str(tmp_path))
    assert r.returncode == 2 and "run_manifest.json: corrupt" in " ".join(r.stderr.split())
    # a missing optional record is not an error: the caller says what it does without it
    assert read_json(tmp_path / "nothing.json", None) is None
    try:
        read_json(tmp_path / "nothing.json")
    except OpenSEMError as e:
        assert "nothing.json: not found" in str(e)
    else:
        raise AssertionError("a required record that is missing must be an error")


def test_a_bad_golden_set_stops_the_run_before_the_forge_pays_for_anything(tmp_path):
    from opensem.workspace import init_workspace

    init_workspace(tmp_path)
    (tmp_path / "data/raw/notes.txt").write_text("The pump runs at 12 bar. It weighs 14 kilograms in all.")
    (tmp_path / "evals/golden_set.json").write_text('[{"question": "q?"}]')
    r = run_cli("run", "-w", str(tmp_path))
    assert r.returncode == 2 and "golden_set.json: item 1: key 'answer': Field required" in " ".join(r.stderr.split())
    assert not (tmp_path / "data/processed/train.jsonl").exists() and not (tmp_path / ".opensem/cache").exists()


def _judged_run(ws: Path, run_id: str, scores: list[int], golden: str = "evals/golden_set.json sha256:g", chain=None,
                retrieval: list[int] | None = None) -> None:
    def items(scores):
        return [{"id": f"q{i}", "question": f"Question {i}?", "golden": "Gold.", "output": "Out.", "score": s, "reason": ""}
                for i, s in enumerate(scores)]
    res = ws / "evals/reports" / run_id / "results.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    lineage = {"golden_set": golden, "judge": "reference-scorer-v1", "adapter": f"{ws}/models/adapters/sft-{run_id} sha256:a",
               **({"chain": chain} if chain else {})}
    res.write_text(json.dumps({"items": items(scores), "pass_threshold": 4, "summary": {"mean_score": sum(scores) / len(scores)},
                               "lineage": lineage, **({"retrieval": {"items": items(retrieval)}} if retrieval else {})}))
    (ws / "runs" / run_id).mkdir(parents=True)
    (ws / "runs" / run_id / "run_manifest.json").write_text(json.dumps({
        "run_id": run_id, "pipeline": ["train", "fine-tuned"], "train": {"run_name": f"sft-{run_id}"},
        "fine_tuned": {"results": str(res), "comparison": {"mean_diff": 0.5},
                       "artifacts": {"results": {"path": str(res.relative_to(ws)), "sha256": file_sha256(res)}}}}))


def test_two_runs_are_compared_question_by_question(tmp_path):
    from opensem.workspace import init_workspace

    ws = tmp_path / "ws"
    init_workspace(ws)
    _judged_run(ws, "A", [2, 2, 3, 1, 4, 2, 2, 3, 1, 2, 2, 3])
    _judged_run(ws, "B", [4, 3, 3, 3, 5, 4, 2, 4, 3, 4, 3, 3], chain="base -> cpt (c, merge) -> sft (sft-B)")
    r = run_cli("runs", "-w", str(ws), "--compare", "A", "B")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())
    assert "mean score difference B - A: +1.17" in said and "win / tie / loss 9 / 3 / 0: B is better" in said
    assert "cpt (c, merge) -> sft (sft-B)" in said and "sft-A" in said  # each model as its judge lineage names it
    r = run_cli("runs", "-w", str(ws), "--compare", "B", "A")
    assert "B - A" not in r.stdout and "A is worse" in " ".join(r.stdout.split())
    _judged_run(ws, "C", [3] * 12, golden="evals/golden_set.json sha256:other")
    r = run_cli("runs", "-w", str(ws), "--compare", "A", "C")
    assert r.returncode == 2 and "differ in their golden set" in r.stderr
    r = run_cli("runs", "-w", str(ws), "--compare", "A", "nope")
    assert r.returncode == 2 and "runs/nope: no run manifest there" in r.stderr
    (ws / "evals/reports/A/results.json").write_text("{}")
    r = run_cli("runs", "-w", str(ws), "--compare", "A", "B")
    assert r.returncode == 2 and "runs/A: its judge results were changed or removed since the run" in r.stderr


def test_two_runs_judged_with_retrieval_are_compared_on_all_their_rows(tmp_path):
    """A RAFT adapter against plain SFT: each with and without retrieval, paired question by question."""
    from opensem.workspace import init_workspace

    ws = tmp_path / "ws"
    init_workspace(ws)
    _judged_run(ws, "sft", [2, 3] * 6, retrieval=[3, 3] * 6)
    _judged_run(ws, "raft", [2, 2] * 6, retrieval=[5, 4] * 6)
    r = run_cli("runs", "-w", str(ws), "--compare", "sft", "raft", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())
    assert "raft - sft: -0.50" in said
    assert "raft + retrieval vs sft + retrieval │ +1.50" in said and "raft + retrieval vs sft │ +2.00" in said, said
    assert "raft vs sft + retrieval │ -1.00" in said


def test_the_runs_table_is_each_stages_own_cells_then_the_comparison():
    from opensem.pipeline import run_row

    m = {"run_id": "r1", "pipeline": ["forge", "baseline", "train", "fine-tuned"], "forge": {"counts": {"train": 12}},
         "baseline": {"summary": {"mean_score": 1.5}}, "train": {"adapter": "models/adapters/x"},
         "fine_tuned": {"summary": {"mean_score": 3.25}},
         "comparison": {"mean_diff": 1.75, "mean_diff_ci": [1.0, 2.5], "accuracy_baseline": 0.1, "accuracy_fine_tuned": 0.6}}
    assert run_row(m) == {"run": "r1", "pairs": "12", "baseline": "1.50", "adapter": "x", "fine-tuned": "3.25",
                          "diff [95% CI]": "+1.75 [1.00, 2.50]", "accuracy": "10% -> 60%"}
    # a stage that cannot be loaded any more (its package gone) leaves its cells out; the rest stay
    m["pipeline"].insert(1, "gone_package.stages:Gone")
    assert run_row(m)["fine-tuned"] == "3.25"

