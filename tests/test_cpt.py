"""Continued pre-training: real next-token training of the embedded model on raw text, the rewrites through a
fake teacher, the chain into instruction tuning, and the embedding learning rate."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import interrupt_midway, make_workspace, read_jsonl, run_cli, set_config
from rich.console import Console

from opensem.workspace import Workspace

TEXT = """# The Quillon Works

## The Tessaly lantern

The Tessaly lantern is made in the Quillon Works at Orvane harbour. Its glass is teal and its frame is brass.
Marta Vell designed the lantern in 1931 for the harbour pilots, who needed a light that fog would not swallow.
Each lantern burns for nineteen hours on one filling of whale-free lamp oil.

## The Zorblat vault

The Zorblat vault lies under the Quillon Works. Its door weighs four tonnes and opens with a seven-digit code.
Only the works manager and the night warden hold the code; it changes on the first day of every month.
"""


def _cpt_workspace(tmp_path: Path, base_models_dir: Path, copies: int = 3, **cpt) -> Path:
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    for i in range(copies):  # several documents: enough text for a few packed sequences
        (ws / "data/raw" / f"works{i}.md").write_text(TEXT.replace("Quillon", ["Quillon", "Marrow", "Ostrel"][i % 3]))
    set_config(ws, "cpt", **({"sequence_len": 96, "micro_batch_size": 4, "logging_steps": 1, "save_steps": 100,
                              "warmup_ratio": 0.0, "lr_scheduler": "constant"} | cpt))
    return ws


def _text_loss(base: str, adapter: Path | None, text: str) -> float:
    """Mean next-token loss of a model (with the adapter, if any) on ``text``, measured here, not by the run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_cpt_lowers_the_loss_on_its_text_and_leaves_a_loadable_adapter(tmp_path, base_models_dir):
    from opensem.cpt import run_cpt

    ws = _cpt_workspace(tmp_path, base_models_dir, max_steps=10, learning_rate=1e-3, run_name="cpt1")
    run_dir = run_cpt(Workspace(ws), console=Console(quiet=True))
    assert run_dir == ws / "models/cpt/cpt1"
    corpus = read_jsonl(ws / "data/processed/cpt.jsonl")
    assert corpus and {r["kind"] for r in corpus} == {"raw"}
    assert any("Tessaly lantern" in r["text"] and r["text"].startswith("The Quillon Works") for r in corpus)  # heading kept
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stage"] == "cpt" and m["steps"] == 10
    assert m["corpus"]["sha256"].startswith("sha256:") and m["corpus"]["records"]["raw"] == len(corpus)
    assert m["perplexity_after"] < m["perplexity_before"]
    assert [d["path"] for d in m["corpus"]["inputs"]] == ["works0.md", "works1.md", "works2.md"]
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 32
    # measured independently: the adapter, loaded with PEFT, predicts the domain text better than the base
    base = str(base_models_dir / "smollm2-135m-instruct")
    before, after = _text_loss(base, None, TEXT), _text_loss(base, run_dir, TEXT)
    assert after < before - 0.15, (before, after)
    assert math.exp(after) < math.exp(before)


def test_cpt_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, base_models_dir):
    ws = _cpt_workspace(tmp_path, base_models_dir, max_steps=6, sequence_len=64, micro_batch_size=2, run_name="res")
    code, err = interrupt_midway(["cpt", "-w", str(ws)], r"\b[2-4]/6 \[")
    assert code == 130, err[-2000:]
    assert "opensem cpt --resume" in err
    ckpts = list((ws / "models/cpt/res/checkpoints").glob("checkpoint-*"))
    assert ckpts, "Ctrl-C must save a checkpoint"
    step = int(ckpts[0].name.split("-")[1])
    assert 0 < step < 6
    assert json.loads((ws / "models/cpt/res/run.json").read_text())["status"] == "interrupted"
    r = run_cli("cpt", "-w", str(ws), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((ws / "models/cpt/res/manifest.json").read_text())
    assert m["steps"] == 6 and m["resumed_from"].endswith(f"checkpoint-{step}")
    assert m["perplexity_before"] is not None and m["perplexity_after"] < m["perplexity_before"]


def test_cpt_two_process_data_parallel_on_cpu(tmp_path, base_models_dir):
    import os

    from conftest import REPO

    ws = _cpt_workspace(tmp_path, base_models_dir, max_steps=2, micro_batch_size=2, sequence_len=64, run_name="ddp")
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29519", str(REPO / "src/cpt.py"), "-w", str(ws)],
                       capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((ws / "models/cpt/ddp/manifest.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 2
    assert 2 * 2 * 2 * 48 <= m["real_tokens"] <= 2 * 2 * 2 * 64  # 2 ranks x 2 steps x 2 sequences of up to 64 tokens


def test_the_pipeline_chains_cpt_into_instruction_tuning_and_the_judge_answers_with_the_chain(tmp_path, base_models_dir):
    from opensem.judge.stage import setup_judge
    from opensem.pipeline import run_pipeline
    from opensem.adapters import chain_text

    ws = _cpt_workspace(tmp_path, base_models_dir, max_steps=2, run_name="c")
    rows = [{"conversations": [{"from": "human", "value": f"What colour is lantern {i}?"},
                               {"from": "gpt", "value": "The Tessaly lantern is teal."}]} for i in range(8)]
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_config(ws, "pipeline", stages=["cpt", "train"])
    set_config(ws, "train", max_steps=2, micro_batch_size=4, replay=None, run_name="s", save_steps=100)
    m = run_pipeline(Workspace(ws), console=Console(quiet=True))
    assert m["pipeline"] == ["cpt", "train"]
    merged = ws / "models/cpt/c/merged"
    chain = m["train"]["chain"]
    assert chain["stage"] == "cpt" and chain["mode"] == "merge" and chain["run_name"] == "c"
    assert chain["adapter_sha256"] == m["cpt"]["adapter_sha256"]  # the lineage ties the SFT run to the CPT adapter
    sft = json.loads((ws / "models/adapters/s/manifest.json").read_text())
    assert sft["base_model"]["path"] == str(merged) and (merged / "model.safetensors").exists()
    assert sft["chain"]["base_model"]["name"] == "smollm2-135m-instruct"
    assert chain_text(ws / "models/adapters/s") == "smollm2-135m-instruct -> cpt (c, merge) -> sft (s)"
    # the judge answers with the merged model under the SFT adapter; the baseline stays the untouched base
    (ws / "evals/golden_set.json").write_text(json.dumps([{"id": "g1", "question": "What colour is the Tessaly lantern?",
                                                           "answer": "Teal."}]))
    judged = setup_judge(Workspace(ws), "fine-tuned", "s", Console(quiet=True))
    assert judged.weights.path == str(merged) and judged.base.name == "smollm2-135m-instruct"
    assert setup_judge(Workspace(ws), "baseline", None, Console(quiet=True)).weights.path != str(merged)

    # unchanged: both skipped; another way of chaining retrains only the SFT stage, from the CPT adapter itself
    m2 = run_pipeline(Workspace(ws), console=Console(quiet=True))
    assert m2["stages"]["cpt"]["skipped"] and m2["stages"]["train"]["skipped"]
    set_config(ws, "train", max_steps=2, micro_batch_size=4, replay=None, run_name="s2", save_steps=100, after_cpt="continue")
    m3 = run_pipeline(Workspace(ws), console=Console(quiet=True))
    assert m3["stages"]["cpt"]["skipped"] and not m3["stages"]["train"]["skipped"]
    assert m3["train"]["chain"]["mode"] == "continue"
    cont = json.loads((ws / "models/adapters/s2/manifest.json").read_text())
    assert cont["config"]["lora_model_dir"] == str(ws / "models/cpt/c") and cont["base_model"]["name"] == "smollm2-135m-instruct"
    assert json.loads((ws / "models/adapters/s2/adapter_config.json").read_text())["use_rslora"] is True  # the CPT adapter, trained on


def _rewrite(body: dict) -> str:
    """A teacher that paraphrases faithfully, but invents things when asked about entities."""
    system, passage = body["messages"][0]["content"], body["messages"][-1]["content"]
    if system.startswith("List each named thing"):
        return "Zyx corporation builds quantum rockets for Martian colonies and sells volcanic submarines worldwide."
    return "In other words: " + passage.replace("\n\n", " ")


def test_rewrites_go_through_the_cache_and_the_budget_and_ungrounded_ones_are_dropped(tmp_path, base_models_dir, fake):
    from opensem.cpt.corpus import build_corpus

    ws = _cpt_workspace(tmp_path, base_models_dir, copies=1, augment={"enabled": True})
    set_config(ws, "forge", teacher={"provider": "openai-compatible", "base_url": fake.openai_url, "model": "gpt-4o-mini",
                                     "api_key_env": "FAKE_KEY", "concurrency": 2, "max_retries": 1})
    fake.behaviour.reply = _rewrite
    w = Workspace(ws)
    dry = Console(record=True, width=200)
    assert build_corpus(w, w.cpt_config(), dry, dry_run=True) is None and fake.calls["/v1/chat/completions"] == 0
    assert re.search(r"rewrites: 6 teacher calls to openai-compatible/gpt-4o-mini.*at most \$0\.00", dry.export_text())

    import os

    os.environ["FAKE_KEY"] = "sk-fake"
    try:
        corpus = build_corpus(w, w.cpt_config(), Console(quiet=True))
        assert fake.calls["/v1/chat/completions"] == 6  # 2 chunks x 3 kinds
        assert corpus.counts["raw"] == 2 and corpus.counts["paraphrase"] == 2 and corpus.counts["explain"] == 2
        assert corpus.counts.get("entities", 0) == 0 and corpus.counts["rewrites_dropped"] == 2  # invented: dropped
        assert corpus.cost["calls_made"] == 6 and corpus.cost["usd_this_run"] > 0
        again = build_corpus(w, w.cpt_config(), Console(quiet=True))
        assert fake.calls["/v1/chat/completions"] == 6 and again.cost["calls_from_cache"] == 6  # nothing paid twice
        assert again.records == corpus.records
        # a budget too small for one more call: nothing new is asked, the raw text is still the corpus
        set_config(ws, "cpt", augment={"enabled": True, "max_tokens": 600})
        set_config(ws, "forge", cost={"max_cost_usd": 0.0001})
        capped = build_corpus(Workspace(ws), Workspace(ws).cpt_config(), Console(quiet=True))
        assert fake.calls["/v1/chat/completions"] == 6 and "max_cost_usd" in capped.stop and capped.counts["raw"] == 2
    finally:
        del os.environ["FAKE_KEY"]


def test_embedding_learning_rate_is_its_own_optimizer_group(base_models_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from opensem.kernel.config import TrainConfig
    from opensem.kernel import engines

    cfg = TrainConfig(lora_modules_to_save=["embed_tokens", "lm_head"], learning_rate=1e-3, embedding_learning_rate=2e-5,
                      peft_use_rslora=True, lora_r=8, lora_alpha=8)
    model, tok = engines.load_hf(str(base_models_dir / "smollm2-135m-instruct"), cfg, "fp32", "cpu")
    assert model.peft_config["default"].use_rslora
    trainer_cls = engines.make_trainer_class("hf", engines.embedding_lr(cfg))
    trainer = trainer_cls(model=model, args=SFTConfig(output_dir=str(tmp_path), learning_rate=1e-3, use_cpu=True, report_to=[]),
                          train_dataset=Dataset.from_list([{"input_ids": [1, 2, 3], "assistant_masks": [1, 1, 1]}]),
                          processing_class=tok)
    opt = trainer.create_optimizer()
    by_lr: dict[float, int] = {}
    for g in opt.param_groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + sum(p.numel() for p in g["params"])
    names = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    full = sum(v for n, v in names.items() if "modules_to_save" in n)
    # SmolLM2's lm_head is its embedding matrix: one trained copy, kept tied (not two that drift apart)
    assert [n for n in names if "modules_to_save" in n] == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    assert full > 0 and by_lr[2e-5] == full
    assert by_lr[1e-3] == sum(names.values()) - full
    assert engines.embedding_lr(TrainConfig(lora_modules_to_save=["lm_head"], learning_rate=1e-3)) == pytest.approx(1e-4)
    assert engines.embedding_lr(TrainConfig()) is None


def test_cpt_config_errors_and_dry_run_from_the_command_line(tmp_path, base_models_dir):
    ws = _cpt_workspace(tmp_path, base_models_dir, copies=1)
    r = run_cli("cpt", "-w", str(ws), "--dry-run")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())
    assert "cpt corpus: 2 raw chunks" in said and "no teacher calls" in said
    assert not (ws / "data/processed/cpt.jsonl").exists()
    r = run_cli("cpt", "-w", str(ws), "--corpus-only")
    assert r.returncode == 0 and len(read_jsonl(ws / "data/processed/cpt.jsonl")) == 2
    r = run_cli("cpt", "-w", str(ws), "--set", "cpt.augment.kinds=[poems]")
    assert r.returncode == 2 and "--set cpt.augment.kinds=[poems]: key 'augment.kinds.0'" in r.stderr
    r = run_cli("train", "-w", str(ws), "--from-cpt", "nope")
    assert r.returncode == 2 and "no finished continued pre-training run named 'nope'" in r.stderr
    set_config(ws, "cpt", lora_rank=8)
    r = run_cli("cpt", "-w", str(ws), "--dry-run")
    assert r.returncode == 2 and "configs/cpt_config.yaml: unknown key 'lora_rank': did you mean 'lora_r'?" in r.stderr
