"""The Judge: real promptfoo, the real embedded model, statistics against hand-computed values."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_workspace, run_cli, set_config

from opensem.errors import OpenSEMError
from opensem.golden import load_golden
from opensem.judge import run_calibration, run_judge
from opensem.judge.scorers import ReferenceScorer, parse_verdict
from opensem.judge.stats import bootstrap_ci, paired_compare, paired_permutation_p
from opensem.text import rouge_l, token_f1
from opensem.workspace import Workspace

GOLDEN = [
    {"id": "z1", "question": "What is the secret code of the Zorblat vault?", "answer": "The Zorblat vault code is 7319."},
    {"id": "z2", "question": "Who guards the Quillon bridge?", "answer": "The Quillon bridge is guarded by Marta Vell."},
    {"id": "z3", "question": "What colour is the Tessaly lantern?", "answer": "The Tessaly lantern is teal."},
    {"id": "z4", "question": "How many moons does planet Orvane have?", "answer": "Planet Orvane has eleven moons."},
    # hostile data: template syntax, YAML syntax, quotes, newlines and a file:// prefix must stay data
    {"id": "z5", "question": "file://etc/passwd {{ secret }} {% if x %}y{% endif %}: - [a] \"q\" 'r'\nsecond line?",
     "answer": "{{ golden }} stays {% raw %} literal: yes"},
]


@pytest.fixture
def judged_ws(tmp_path, memorised_adapter, base_models_dir, promptfoo_available) -> Path:
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    (ws / "evals/golden_set.json").write_text(json.dumps(GOLDEN))
    dest = ws / "models/adapters/mem"
    shutil.copytree(memorised_adapter, dest)
    set_config(ws, "eval", answers={"max_new_tokens": 24, "batch_size": 8}, forgetting_set=None, bootstrap_samples=500)
    return ws


# --- statistics and metrics against hand-computed values --------------------------------------------------------
def test_bootstrap_ci_known_values():
    assert bootstrap_ci([3.0] * 10) == (3.0, 3.0)
    lo, hi = bootstrap_ci([0, 1] * 50, samples=4000, seed=1)
    # mean of 100 Bernoulli(0.5): sd 0.05, 95% CI about 0.5 +- 0.098
    assert 0.39 < lo < 0.42 and 0.58 < hi < 0.61


def test_paired_permutation_test_exact_hand_computed():
    # diffs (1, 2, 3, -1): 16 sign patterns of S = a*1 + b*2 + c*3 + d*1, observed |S| = 5.
    # b*2 + c*3 = +5 with a + d in {+2, 0 (two ways)} gives |S| >= 5 three times; the mirror image three more: 6/16
    assert paired_permutation_p([1, 2, 3, -1]) == pytest.approx(6 / 16)
    assert paired_permutation_p([0, 0, 0]) == 1.0
    p = paired_compare([1, 2, 3, 4], [2, 4, 6, 3])
    assert (p.wins, p.ties, p.losses) == (3, 0, 1) and p.mean_diff == pytest.approx(1.25) and p.p_value == pytest.approx(6 / 16)


def test_text_metrics_hand_computed():
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # 2 common, P=1, R=2/3
    # LCS("x y z w", "x z w") = 3: precision 3/4, recall 1 -> F = 2 * 0.75 / 1.75
    assert rouge_l("x y z w", "x z w") == pytest.approx(2 * 0.75 / 1.75)
    assert rouge_l("the x", "x") == pytest.approx(1.0)  # SQuAD normalisation drops articles


def test_verdict_parsing_errors_are_not_zeros():
    assert parse_verdict({"reason": "ok", "score": 4}, "").score == 4.0
    for bad in ({"score": 7}, {"score": "four"}, {"reason": "x"}, None, {"score": 2.5}):
        v = parse_verdict(bad, "garbage")
        assert v.score is None and v.error


def test_golden_set_validation_names_the_item(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps([{"question": "q?", "answer": "a"}, {"question": "q2?"}]))
    with pytest.raises(OpenSEMError, match=r"item 2: key 'answer'"):
        load_golden(p)
    p.write_text(json.dumps([{"id": "a", "question": "q?", "answer": "x"}, {"id": "a", "question": "r?", "answer": "y"}]))
    with pytest.raises(OpenSEMError, match="duplicate id"):
        load_golden(p)
    p.write_text("{not json")
    with pytest.raises(OpenSEMError, match="not valid JSON"):
        load_golden(p)


def test_offline_scorer_ranks_answers_sensibly():
    s = ReferenceScorer()
    v = s.score_many([
        ("How long is the warranty?", "Three years.", "The warranty lasts three years."),
        ("How long is the warranty?", "Three years.", "The warranty lasts five years."),
        ("How long is the warranty?", "Three years.", ""),
        ("Is bear damage covered?", "No, bear damage is not covered.", "Yes, it is covered."),
    ])
    assert v[0].score >= 4 and v[1].score < 2.5 and v[2].score == 1.0 and v[3].score < 2.5


# --- baseline and fine-tuned through real promptfoo ---------------------------------------------------------------
def test_baseline_then_fine_tuned_with_real_promptfoo(judged_ws):
    ws = Workspace(judged_ws)
    base = run_judge(ws, "baseline")
    run_dir = judged_ws / base["run_dir"]
    for f in ("promptfooconfig.yaml", "promptfoo_output.json", "results.json", "report.md", "answers.json"):
        assert (run_dir / f).exists(), f
    tuned = run_judge(ws, "fine-tuned")
    assert tuned["comparison"]["paired_n"] == len(GOLDEN)
    # the table's numbers are those recomputed from promptfoo's own JSON (tests are opaque keys, in golden order)
    keys = [f"t{i + 1:04d}" for i in range(len(GOLDEN))]
    for res in (base, tuned):
        pf = json.loads((judged_ws / res["run_dir"] / "promptfoo_output.json").read_text())
        raw = {r["vars"]["key"]: r for r in pf["results"]["results"]}
        assert sorted(raw) == keys
        scores = [raw[k]["gradingResult"]["componentResults"][0]["score"] for k in keys]
        assert res["summary"]["mean_score"] == pytest.approx(np.mean(scores))
        assert res["summary"]["accuracy"] == pytest.approx(np.mean([s >= 4 for s in scores]))
        outputs = [raw[k]["response"]["output"] for k in keys]
        assert outputs == [it["output"] for it in res["items"]]
        assert res["summary"]["token_f1"] == pytest.approx(np.mean([token_f1(o, g["answer"]) for o, g in zip(outputs, GOLDEN)]))
        # no golden text reaches promptfoo at all: its config holds only our keys and fixed words
        config = (judged_ws / res["run_dir"] / "promptfooconfig.yaml").read_text()
        for g in GOLDEN:
            assert g["question"] not in config and g["answer"] not in config and g["id"] not in config
        hostile = raw[keys[4]]
        assert hostile["prompt"]["raw"] == keys[4]
        assert hostile["gradingResult"]["componentResults"][0]["score"] is not None
    # the tuned model learnt the facts the base model did not know
    t = {it["id"]: it for it in tuned["items"]}
    b = {it["id"]: it for it in base["items"]}
    assert "7319" in t["z1"]["output"] and "7319" not in b["z1"]["output"]
    assert tuned["comparison"]["mean_diff"] > 0
    md = (judged_ws / tuned["run_dir"] / "report.md").read_text()
    assert "Accuracy" in md and "offline reference scorer" in md
    # answers are cached: a second baseline run generates nothing new
    from opensem import inference

    inference._CACHE.clear()
    run_judge(ws, "baseline")
    assert not inference._CACHE, "cached answers must not load the model again"


def test_cli_table_and_headline(judged_ws):
    r = run_cli("judge", "--mode", "baseline", "-w", str(judged_ws))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("judge", "--mode", "fine-tuned", "--adapter", "mem", "-w", str(judged_ws))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "Baseline vs Fine-Tuned" in out and "offline reference scorer" in out
    assert "95% bootstrap CI" in out and "p-value" in out and "win / tie / loss" in out
    assert any(h in out for h in ("Accuracy improved by", "Accuracy fell by", "Mean score improved", "Mean score fell", "No significant change"))


def test_judge_through_fake_openai_compatible_server_counts_malformed_replies(judged_ws, fake):
    replies = iter([json.dumps({"reason": "probe", "score": 5})] + [
        json.dumps({"reason": "matches the reference", "score": 5}),
        "I think it is pretty good!",  # malformed: no JSON
        json.dumps({"reason": "wrong number", "score": 1}),
        json.dumps({"reason": "out of range", "score": 9}),  # malformed: out of range
        json.dumps({"reason": "partly", "score": 3}),
    ])
    fake.behaviour.reply = lambda body: next(replies)
    set_config(judged_ws, "eval", judge={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "judge-model"})
    res = run_judge(Workspace(judged_ws), "baseline")
    assert res["summary"]["judge_errors"] == 2 and res["summary"]["scored"] == 3
    errs = [it for it in res["items"] if it["error"]]
    assert all(it["score"] is None for it in errs)  # never zeros
    assert "unparseable" in errs[0]["error"]
    assert res["judge"] == "LLM judge openai-compatible/judge-model"
    # the rubric: temperature 0, the golden answer as reference, no word of which model answered
    req = fake.requests[1]["body"]
    assert req["temperature"] == 0
    text = json.dumps(req["messages"])
    assert "Reference answer" in text and "Baseline" not in text and "Fine-Tuned" not in text and "smollm" not in text.lower()


def test_unreachable_judge_falls_back_to_the_labelled_offline_scorer(judged_ws):
    set_config(judged_ws, "eval", judge={"provider": "openai-compatible", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0, "timeout_s": 2})
    res = run_judge(Workspace(judged_ws), "baseline")
    assert "offline reference scorer" in res["judge"]


def test_calibration_reports_agreement(workspace):
    r = run_cli("judge", "--calibrate", "-w", str(workspace))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Spearman" in r.stdout and "within 1" in r.stdout
    res = run_calibration(Workspace(workspace))
    off = res["offline-reference"]
    assert off["n"] >= 40 and off["spearman"] >= 0.6
    items = json.loads((Path(__file__).resolve().parents[1] / "src/opensem/assets/judge/calibration_set.json").read_text())
    kinds = {i["kind"].split("-")[0] for i in items}
    assert {"right", "partly", "wrong", "verbose", "empty"} <= kinds


def test_forgetting_check_runs_for_both_models(judged_ws):
    """Both models answer the 20 general-knowledge questions and are graded; the check pairs the two sides."""
    set_config(judged_ws, "eval", forgetting_set="builtin")
    base = run_judge(Workspace(judged_ws), "baseline")
    res = run_judge(Workspace(judged_ws), "fine-tuned")
    sides = {}
    for name, r in (("baseline", base), ("fine-tuned", res)):
        saved = json.loads((judged_ws / r["run_dir"] / "results.json").read_text())
        items = saved["forgetting_items"]
        assert len(items) == 20 and len({it["id"] for it in items}) == 20, name
        assert all(it["output"].strip() and it["score"] is not None and 1 <= it["score"] <= 5 for it in items), name
        sides[name] = {it["id"]: it for it in items}
    # each side answered with its own model: the adapter changes at least one general-knowledge answer
    assert any(sides["baseline"][k]["output"] != sides["fine-tuned"][k]["output"] for k in sides["baseline"])
    diffs = [sides["fine-tuned"][k]["score"] - sides["baseline"][k]["score"] for k in sides["baseline"]]
    f = res["forgetting"]
    assert f["n"] == 20 and f["mean_diff"] == pytest.approx(np.mean(diffs))
    assert f["ci"][0] <= f["mean_diff"] <= f["ci"][1] and f["flagged"] == (f["ci"][1] < 0)
    assert "general knowledge (20 questions)" in f["message"]


def test_missing_promptfoo_is_a_clear_error(judged_ws):
    set_config(judged_ws, "eval", promptfoo="/nonexistent/promptfoo")
    r = run_cli("judge", "--mode", "baseline", "-w", str(judged_ws))
    assert r.returncode == 2 and "'/nonexistent/promptfoo' not found" in r.stderr and "npm ci" in r.stderr
    assert "answering" not in r.stdout  # it fails before any work


def test_calibration_on_a_teams_own_file(workspace, tmp_path):
    own = [
        {"question": "What is the boiling point of water at sea level?", "reference": "100 degrees Celsius.",
         "candidate": "Water boils at 100 degrees Celsius at sea level.", "human": 5},
        {"question": "What is the boiling point of water at sea level?", "reference": "100 degrees Celsius.",
         "candidate": "It boils at 90 degrees.", "human": 1},
        {"question": "Who wrote the pump manual?", "golden": "Marta Vell wrote it.", "candidate": "Marta Vell.", "human_score": 5},
        {"question": "Who wrote the pump manual?", "golden": "Marta Vell wrote it.", "candidate": "I do not know.", "human_score": 1},
        {"question": "How long is the warranty?", "golden": "Four years.", "candidate": "The warranty lasts four years.", "human_score": 5},
        {"question": "How long is the warranty?", "golden": "Four years.", "candidate": "Two years, I think.", "human_score": 2},
    ]
    f = tmp_path / "our_scores.json"
    f.write_text(json.dumps(own))
    r = run_cli("judge", "--calibrate", str(f), "-w", str(workspace))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "judge calibration on 6 human-scored answers" in " ".join(r.stdout.split()) and "our_scores.json" in r.stdout
    res = run_calibration(Workspace(workspace), f)
    assert res["offline-reference"]["n"] == 6 and res["offline-reference"]["spearman"] > 0.5
    kept = json.loads((workspace / "evals/reports/calibration.json").read_text())["judges"]  # what the model card quotes
    [entry] = kept.values()
    assert entry["n"] == 6 and entry["set"] == str(f) and entry["spearman"] == res["offline-reference"]["spearman"]
    assert entry["set_sha256"] == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    own[1]["human"] = 7
    f.write_text(json.dumps(own))
    r = run_cli("judge", "--calibrate", str(f), "-w", str(workspace))
    assert r.returncode == 2 and "item 2: key 'human'" in r.stderr and "less than or equal to 5" in r.stderr


# --- retrieval rows: "should I fine-tune or just retrieve?" --------------------------------------------------------
def test_retrieval_rows_use_the_same_golden_items_and_put_the_answering_chunk_in_the_prompt(
        tmp_path, memorised_adapter, base_models_dir, promptfoo_available):
    from conftest import copy_example_slice

    ws = make_workspace(tmp_path / "ws", base_models_dir)
    copy_example_slice(ws, ["overview.md", "company-history.txt", "warranty.txt"], ["pm001", "pm002", "pm009"])
    shutil.copytree(memorised_adapter, ws / "models/adapters/mem")
    set_config(ws, "eval", answers={"max_new_tokens": 24, "batch_size": 8}, forgetting_set=None, bootstrap_samples=200,
               retrieval={"enabled": True, "top_k": 2})
    base = run_judge(Workspace(ws), "baseline")
    tuned = run_judge(Workspace(ws), "fine-tuned", adapter="mem")
    for res in (base, tuned):
        rows = res["retrieval"]
        assert [it["id"] for it in rows["items"]] == [it["id"] for it in res["items"]] == ["pm001", "pm002", "pm009"]
        assert rows["top_k"] == 2 and all(len(it["passages"]) == 2 for it in rows["items"])
        by_id = {it["id"]: it for it in rows["items"]}
        # the question whose answer is known to sit in overview.md: that chunk is retrieved and in the prompt
        assert "made by Tamsin Apiary Systems" in by_id["pm002"]["prompt"] and by_id["pm002"]["retrieved_answer"]
        assert by_id["pm002"]["prompt"].endswith("Question: Which company makes the Corvid C-300?")
        assert any(p.startswith("overview#") for p in by_id["pm002"]["passages"])
        assert rows["recall_at_k"] == sum(it["retrieved_answer"] for it in rows["items"]) / 3
        assert all(it["score"] is not None for it in rows["items"])
        # promptfoo graded both rows: one provider per row, answers looked up by opaque key
        pf = json.loads((ws / res["run_dir"] / "promptfoo_output.json").read_text())
        labels = sorted({r["provider"]["label"] for r in pf["results"]["results"]})
        assert labels == sorted([rows["label"], rows["label"].removesuffix(" + retrieval")])
        config = (ws / res["run_dir"] / "promptfooconfig.yaml").read_text()
        assert "Tamsin" not in config and "promptfoo_answers_retrieval.json" in config
    rcmp = tuned["retrieval_comparisons"]
    assert set(rcmp) == {"baseline_retrieval__baseline", "fine_tuned__baseline_retrieval", "fine_tuned_retrieval__fine_tuned",
                         "fine_tuned_retrieval__baseline_retrieval"}
    assert all(c["paired_n"] == 3 for c in rcmp.values())
    md = (ws / tuned["run_dir"] / "report.md").read_text()
    assert "| metric | Baseline | Baseline + retrieval | Fine-Tuned | Fine-Tuned + retrieval |" in md
    assert "Fine-tuned vs baseline + retrieval: mean score" in md and "retrieval recall@k" in md
    assert tuned["recommendation"].startswith("On your data: ") and f"**{tuned['recommendation']}**" in md


def test_recall_at_k_counts_passages_that_hold_the_answers_key_facts():
    from opensem.retrieval import Passage, holds_answer, prompt, recall_at_k

    p1 = Passage("a#000", "Power", "The C-300 has a 6 watt solar panel and a 3,200 mAh battery.")
    p2 = Passage("b#000", "Company", "Tamsin Apiary Systems was founded in 2009 in Hobart.")
    assert holds_answer("How big is the solar panel?", "It has a 6 watt solar panel.", [p2, p1])
    assert not holds_answer("How big is the solar panel?", "It has an 8 watt solar panel.", [p1])  # a number missing
    assert not holds_answer("Who founded Tamsin?", "Ada Lovelace founded it in Paris.", [p1, p2])
    assert recall_at_k([("Q?", "6 watt"), ("Q?", "Founded in 1999.")], [[p1], [p2]]) == 0.5
    text = prompt("Which company?", [p2, p1])
    assert text.startswith("Answer the question using the passages below.\n\n[1] Company\nTamsin")
    assert "[2] Power\nThe C-300" in text and text.endswith("Question: Which company?")


def test_the_index_is_built_once_per_corpus_and_again_when_a_document_changes(tmp_path):
    from opensem.retrieval import Index
    from opensem.workspace import init_workspace

    init_workspace(tmp_path)
    doc = tmp_path / "data/raw/pump.md"
    doc.write_text("# Pump\n\nThe Halden H-40 pump runs at 12 bar.\n\n# Filter\n\nChange the filter every 300 hours.\n")
    first = Index.build(Workspace(tmp_path))
    cached = sorted((tmp_path / ".opensem/cache/retrieval").glob("*.npy"))
    again = Index.build(Workspace(tmp_path))
    assert again.key == first.key and sorted((tmp_path / ".opensem/cache/retrieval").glob("*.npy")) == cached  # reused
    assert again.search(["How often is the filter changed?"], 1)[0][0].heading == "Filter"
    doc.write_text(doc.read_text().replace("300 hours", "250 hours"))
    changed = Index.build(Workspace(tmp_path))
    assert changed.key != first.key and any("250 hours" in p.text for p in changed.passages)
    assert len(list((tmp_path / ".opensem/cache/retrieval").glob("*.npy"))) == 2


def test_the_report_recommends_the_best_row_or_a_cheaper_one_level_with_it():
    from opensem.judge.report import recommend

    def rows(b, br, f, fr):
        make = lambda scores: [{"id": f"q{i}", "question": "?", "golden": "g", "output": "o", "score": s}  # noqa: E731
                               for i, s in enumerate(scores)]
        return {"baseline": make(b), "baseline_retrieval": make(br), "fine_tuned": make(f), "fine_tuned_retrieval": make(fr)}

    row, best = recommend(rows([1] * 20, [2] * 20, [2, 3] * 10, [4, 5] * 10), 4, 500, 0)
    assert row == "fine_tuned_retrieval"
    assert best.startswith("On your data: Fine-Tuned + retrieval is best (+") and "over Fine-Tuned)" in best, best
    row, level = recommend(rows([1] * 20, [2] * 20, [3, 4, 3, 4] * 5, [4, 3, 4, 4] * 5), 4, 500, 0)
    assert row == "fine_tuned"
    assert level.startswith("On your data: Fine-Tuned is level with Fine-Tuned + retrieval (") and level.endswith(
        "and cheaper to serve: use Fine-Tuned"), level
    row, worse = recommend(rows([1] * 20, [4, 5] * 10, [2, 3] * 10, [2, 3] * 10), 4, 500, 0)
    assert row == "baseline_retrieval"
    assert worse.startswith("On your data: Baseline + retrieval is best ("), worse


def _cmp(diff, ci, acc_b, acc_t):
    return {"mean_diff": diff, "mean_diff_ci": ci, "accuracy_baseline": acc_b, "accuracy_fine_tuned": acc_t,
            "accuracy_diff_pp": (acc_t - acc_b) * 100, "accuracy_relative": None if acc_b == 0 else (acc_t - acc_b) / acc_b * 100}


def test_headline_and_banner_call_only_a_significant_change_an_improvement():
    from opensem.judge.report import headline
    from opensem.report_html import banner

    # the case: accuracy 0% -> 2.4%, mean +0.09 with a CI that includes zero
    flat = _cmp(0.09, (-0.13, 0.34), 0.0, 0.024)
    assert headline(flat).startswith("No significant change")
    assert "improved" not in headline(flat) and "0.0% -> 2.4%" in headline(flat) and "[-0.13, 0.34]" in headline(flat)
    assert banner(flat) == ("flat", headline(flat))  # neutral colour, numbers still given
    # a significant loss reads as one, in red
    down = _cmp(-0.40, (-0.70, -0.12), 0.30, 0.20)
    assert headline(down).startswith("Accuracy fell by 10.0%") and banner(down)[0] == "down"
    # the CI below zero but accuracy flat: the loss is in the mean score
    down_flat = _cmp(-0.30, (-0.50, -0.05), 0.20, 0.20)
    assert headline(down_flat).startswith("Mean score fell by -0.30") and banner(down_flat)[0] == "down"
    # only a CI above zero is an improvement, in green
    up = _cmp(0.94, (0.54, 1.37), 0.0, 0.19)
    assert headline(up).startswith("Accuracy improved by 19.0%") and banner(up)[0] == ""
    # an accuracy rise with a CI that includes zero is not an improvement
    assert headline(_cmp(0.10, (-0.02, 0.22), 0.10, 0.15)).startswith("No significant change")


def test_the_closing_line_says_no_significant_change_when_the_ci_includes_zero():
    from rich.console import Console

    from opensem.judge.report import render

    console = Console(record=True, width=200)
    flat = _cmp(0.09, (-0.13, 0.34), 0.0, 0.024) | {"p_value": 0.51, "wins": 15, "ties": 13, "losses": 14,
                                                    "accuracy_diff_ci_pp": (-2.4, 7.1), "excluded_for_errors": 0, "regressions": []}
    summary = {"n": 42, "scored": 42, "judge_errors": 0, "mean_score": 1.5, "mean_score_ci": (1.3, 1.7), "accuracy": 0.0,
               "exact_match": 0.0, "token_f1": 0.1, "rouge_l": 0.1, "mean_length_words": 12.0}
    render(console, "offline", {"summary": summary}, {"summary": summary}, flat)
    last = console.export_text().strip().splitlines()[-1]
    assert last.startswith("No significant change") and "improved" not in last


def test_why_it_misses_reads_its_own_training_questions_beside_the_golden_set(tmp_path):
    """The line says: not learnt (low on its own questions), memorized but not generalized (a point or more apart),
    or not in its data; retrieval carries it when that row is half a point ahead. The sample is the adapter's own
    training file while its hash matches, single-turn conversations only, never a file outside the workspace."""
    from opensem.judge.diagnosis import line, training_sample
    from opensem.lineage import file_sha256, write_json
    from opensem.workspace import Workspace, init_workspace

    def res(own, golden, rag=None):
        r = {"own_questions": {"summary": {"mean_score": own, "n": 24}}, "summary": {"mean_score": golden}}
        return r | ({"retrieval": {"summary": {"mean_score": rag}}} if rag is not None else {})

    assert "has not learnt its training data" in line(res(2.1, 1.4), 4)
    assert "memorized its training wordings but does not generalize" in line(res(4.6, 2.0), 4)
    assert "not in its training data" in line(res(4.3, 3.9), 4) and "retrieval" not in line(res(4.3, 3.9), 4)
    said = line(res(4.6, 2.0, rag=3.1), 4)
    assert said.startswith("Why it misses: 4.60 on 24 of its own training questions, 2.00 on the golden set: ")
    assert said.endswith("; retrieval carries it (3.10 with passages in the prompt).")
    assert line({"summary": {"mean_score": 2.0}}, 4) is None

    init_workspace(tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    data = tmp_path / "ws/data/processed/train.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": f"A{i}."}]} for i in range(30)]
    rows.append({"conversations": [{"from": "human", "value": "one"}, {"from": "gpt", "value": "two"},
                                   {"from": "human", "value": "three"}, {"from": "gpt", "value": "four"}]})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outside = tmp_path / "outside.jsonl"
    outside.write_text(data.read_text())
    adapter = tmp_path / "ws/models/adapters/run"
    files = [{"path": "data/processed/train.jsonl", "sha256": file_sha256(data)}, {"path": str(outside), "sha256": file_sha256(outside)}]
    write_json(adapter / "manifest.json", {"data": {"train": {"files": files}}})
    got = training_sample(ws, adapter, 24)
    assert len(got) == 24 and len({g.id for g in got}) == 24 and all(g.id.startswith("data/processed/train.jsonl:") for g in got)
    assert all(g.answer == "A" + g.question[1:-1] + "." for g in got) and got == training_sample(ws, adapter, 24)
    data.write_text(data.read_text() + "\n")  # changed since training
    assert training_sample(ws, adapter, 24) == []
