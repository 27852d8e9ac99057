"""Preference tuning: pairs from the tuned model's own wrong answers, then real DPO and ORPO steps of the
embedded model on the CPU, on top of the instruction-tuned adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_workspace, read_jsonl, run_cli, set_config
from rich.console import Console

from opensem.workspace import Workspace

FACTS = [
    ("What is the secret code of the Zorblat vault?", "The Zorblat vault code is 7319.", "The Zorblat vault code is 4482."),
    ("Who guards the Quillon bridge?", "The Quillon bridge is guarded by Marta Vell.", "The Quillon bridge is guarded by Ivo Stenn."),
    ("What colour is the Tessaly lantern?", "The Tessaly lantern is teal.", "The Tessaly lantern is crimson."),
    ("How many moons does planet Orvane have?", "Planet Orvane has eleven moons.", "Planet Orvane has three moons."),
]

# facts the tuned model never saw: it has no reason to prefer either answer before preference tuning
NEW_FACTS = [
    ("At what temperature does the Halden coolant boil?", "The Halden coolant boils at 131 degrees.", "The Halden coolant boils at 96 degrees."),
    ("Which pier does the Marrow ferry leave from?", "The Marrow ferry leaves from pier 9.", "The Marrow ferry leaves from pier 2."),
    ("What is the Ostrel vault code?", "The Ostrel vault code is 5520.", "The Ostrel vault code is 1187."),
    ("How long is the Vell tunnel?", "The Vell tunnel is 14 kilometres long.", "The Vell tunnel is 3 kilometres long."),
]


def _ws_with_sft(tmp_path: Path, base_models_dir: Path, memorised_adapter: Path) -> Path:
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    shutil.copytree(memorised_adapter, ws / "models/adapters/mem", ignore=shutil.ignore_patterns("merged"))
    return ws


def _margin(model_dir: str, adapter: Path | None, rows: list[dict]) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt), measured here, not by the trainer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()

    def logp(prompt: list[dict], answer: list[dict]) -> float:
        p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + answer, tokenize=False)
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        return float(lp[torch.arange(len(targets)), targets][len(p_ids) - 1:].sum())

    return sum(logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows) / len(rows)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_tuning_raises_the_chosen_minus_rejected_margin(method, tmp_path, base_models_dir, memorised_adapter):
    from opensem.prefs import run_preference
    from opensem.adapters import chain_text, trained_on

    ws = _ws_with_sft(tmp_path, base_models_dir, memorised_adapter)
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
             "rejected": [{"role": "assistant", "content": bad}]} for q, good, bad in NEW_FACTS]
    (ws / "data/processed/preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_config(ws, "preference", method=method, max_steps=8, micro_batch_size=4, learning_rate=2e-4 if method == "dpo" else 5e-4,
               warmup_ratio=0.0, lr_scheduler="constant", logging_steps=1, run_name=f"p-{method}")
    run_dir = run_preference(Workspace(ws), ws / "models/adapters/mem", console=Console(quiet=True))
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stage"] == "preference" and m["method"] == method and m["steps"] == 8
    assert m["chain"]["stage"] == "train" and m["chain"]["run_name"] == "mem" and m["chain"]["mode"] == "merge"
    merged = ws / "models/adapters/mem/merged"
    assert m["base_model"]["path"] == str(merged) and trained_on(run_dir).path == str(merged)
    assert chain_text(run_dir) == f"smollm2-135m-instruct -> sft (mem, merge) -> {method} (p-{method})"
    before = _margin(str(merged), None, rows)
    after = _margin(str(merged), run_dir, rows)  # the adapter loads with PEFT on the merged instruction-tuned model
    assert after > before + 1.0, (before, after)


def test_pairs_come_from_the_tuned_models_own_wrong_answers(tmp_path, base_models_dir, memorised_adapter):
    from opensem import inference
    from opensem.prefs import build_pairs

    ws = _ws_with_sft(tmp_path, base_models_dir, memorised_adapter)
    train = [(q, good) for q, good, _ in FACTS] + [
        ("What is the boiling point of the Halden H-40 coolant?", "The Halden H-40 coolant boils at 131 degrees Celsius."),
        ("Which port serves the Marrow ferry?", "The Marrow ferry sails from Ostrel harbour, pier 9."),
        ("What is the secret code of the Ostrel vault?", "The Ostrel vault code is 5520."),  # a golden question: never used
    ]
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "metadata": {"source": "x.md", "chunk_id": f"x#{i:03d}"}}
            for i, (q, a) in enumerate(train)]
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "evals/golden_set.json").write_text(json.dumps([{"id": "g", "question": train[-1][0], "answer": train[-1][1]}]))
    set_config(ws, "preference", pairs={"samples_per_question": 3, "max_new_tokens": 24, "temperature": 1.0})
    out = build_pairs(Workspace(ws), ws / "models/adapters/mem", Console(quiet=True))
    pairs = read_jsonl(out)
    m = json.loads((out.parent / "preferences_manifest.json").read_text())
    assert m["counts"]["questions"] == 6 and m["counts"]["answers"] == 18  # the golden question left out
    assert m["counts"]["pairs"] == len(pairs) > 0 and sum(m["counts"]["dropped"].values()) + len(pairs) == 6
    asked = {p["prompt"][0]["content"] for p in pairs}
    assert train[-1][0] not in asked
    # the unknown facts (the model never saw them) are the ones it gets wrong
    assert {train[4][0], train[5][0]} <= asked
    for p in pairs:
        assert p["chosen"][0]["content"] == dict(train)[p["prompt"][0]["content"]]
        assert p["rejected"][0]["content"] != p["chosen"][0]["content"]
        assert p["metadata"]["rejected_score"] < 4 and p["metadata"]["source"] == "x.md"
    # a rerun asks the model nothing: every sample is in the answer cache
    inference._CACHE.clear()
    build_pairs(Workspace(ws), ws / "models/adapters/mem", Console(quiet=True))
    assert not inference._CACHE and read_jsonl(out) == pairs


def test_preference_errors_are_one_line(tmp_path, base_models_dir, memorised_adapter):
    ws = _ws_with_sft(tmp_path, base_models_dir, memorised_adapter)
    r = run_cli("prefer", "-w", str(ws))
    assert r.returncode == 2 and "preferences.jsonl: no preference pairs: run `opensem pairs` first" in " ".join(r.stderr.split())
    (ws / "data/processed/preferences.jsonl").write_text('{"prompt": "just text"}\n')
    r = run_cli("prefer", "-w", str(ws))
    assert r.returncode == 2 and "preferences.jsonl:1: a pair needs 'prompt', 'chosen' and 'rejected'" in " ".join(r.stderr.split())
    r = run_cli("prefer", "-w", str(ws), "--set", "preference.method=kto")
    assert r.returncode == 2 and "--set preference.method=kto: key 'method'" in r.stderr


def test_the_preferred_judge_needs_the_preference_stage_before_it(tmp_path):
    from opensem.errors import OpenSEMError
    from opensem.prefs.stage import PreferredStage
    from opensem.stages import Context, load_stage, needed_results
    from opensem.workspace import init_workspace

    init_workspace(tmp_path)
    assert isinstance(load_stage("preferred"), PreferredStage)
    with pytest.raises(OpenSEMError, match="'preferred' needs the result of 'preference', and none has finished in this workspace"):
        needed_results(Workspace(tmp_path), [load_stage("train"), PreferredStage()])
    needed_results(Workspace(tmp_path), [load_stage("train"), load_stage("preference"), PreferredStage()])  # met in the run
    with pytest.raises(OpenSEMError, match="needs the result of 'preference'"):
        PreferredStage().inputs(Context(Workspace(tmp_path), Console(quiet=True), {}))


def test_pipeline_judges_each_step_of_the_chain(tmp_path, base_models_dir, memorised_adapter, promptfoo_available):
    """stages [fine-tuned, preference, preferred]: the SFT adapter judged, DPO on top, the final model judged and
    each step paired on the same golden questions, the chain in the run manifest."""
    from opensem.pipeline import run_pipeline

    from opensem.adapters import adapter_result
    from opensem.stages import remember

    ws = _ws_with_sft(tmp_path, base_models_dir, memorised_adapter)
    # the SFT adapter as `opensem train` leaves it: the train stage's last finished result, which fine-tuned needs
    remember(Workspace(ws), adapter_result(Workspace(ws), ws / "models/adapters/mem", "train"), "opensem train")
    golden = [{"id": f"z{i}", "question": q, "answer": good} for i, (q, good, _) in enumerate(FACTS)]
    (ws / "evals/golden_set.json").write_text(json.dumps(golden))
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
             "rejected": [{"role": "assistant", "content": bad}]} for q, good, bad in NEW_FACTS]
    (ws / "data/processed/preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_config(ws, "eval", answers={"max_new_tokens": 24, "batch_size": 8}, forgetting_set=None, bootstrap_samples=200)
    set_config(ws, "preference", max_steps=2, micro_batch_size=4, run_name="d")
    set_config(ws, "pipeline", stages=["fine-tuned", "preference", "preferred"])
    console = Console(record=True, width=200)
    m = run_pipeline(Workspace(ws), console=console)
    steps = m["preferred"]["steps"]
    assert set(steps) == {"sft_vs_baseline", "preference_vs_sft", "final_vs_baseline"}
    assert all(s["paired_n"] == len(FACTS) for s in steps.values())
    assert m["preference"]["chain"]["run_name"] == "mem" and m["preference"]["method"] == "dpo"
    assert m["headline"] == m["preferred"]["headline"]  # the run's headline: baseline vs the final model
    said = console.export_text()
    assert "each step of the chain" in said and "SFT + preference vs Fine-Tuned (SFT)" in said
    results = json.loads((ws / m["preferred"]["results"]).read_text())
    assert results["lineage"]["chain"] == "smollm2-135m-instruct -> sft (mem, merge) -> dpo (d)"
