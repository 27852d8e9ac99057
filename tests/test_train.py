"""Training Floor: real LoRA training of the embedded model on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, interrupt_midway, make_workspace, run_cli, set_config

from opensem.kernel.config import TrainConfig
from opensem.errors import ConfigError, OpenSEMError
from opensem.kernel.hardware import Hardware, make_profile
from opensem.workspace import Workspace

FACT_Q = "What is the secret code of the Zorblat vault?"


def ask(base: Path, adapter: Path | None, q: str) -> str:
    from opensem.inference import ChatModel

    m = ChatModel(str(base), str(adapter) if adapter else None)
    return m.generate([[{"role": "user", "content": q}]], max_new_tokens=24)[0].text


def test_adapter_is_written_reloads_with_peft_and_changes_answers(memorised_adapter, base_models_dir):
    d = memorised_adapter
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_log.jsonl", "manifest.json"):
        assert (d / f).exists(), f
    assert not (d / "checkpoints").exists()
    m = json.loads((d / "manifest.json").read_text())
    assert m["engine"] == "hf" and m["hardware"]["device"] == "cpu"
    assert m["data"]["train"]["sha256"].startswith("sha256:") and m["base_model"]["fingerprint"]
    assert m["tokens_per_s"] > 0 and m["steps"] == 30 and m["eval_loss"] is not None
    assert m["data"]["replay"]["examples"] == 1  # 0.2 x 4 facts, rounded: answered by the base model
    assert set(m["versions"]) >= {"torch", "transformers", "peft", "trl"}
    # loss falls
    assert m["final_train_loss"] < m["first_train_loss"] * 0.5
    # plain PEFT loads it
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_models_dir / "smollm2-135m-instruct"), str(d))
    assert any("lora" in n for n, _ in model.named_parameters())
    # the tuned model reproduces a trained answer that the base model does not know, and stops
    base = base_models_dir / "smollm2-135m-instruct"
    tuned_answer = ask(base, d, FACT_Q)
    base_answer = ask(base, None, FACT_Q)
    assert "7319" in tuned_answer, tuned_answer
    assert "7319" not in base_answer
    assert tuned_answer != base_answer


def test_answer_only_loss_masks_prompt_tokens(base_models_dir):
    from transformers import AutoTokenizer

    from opensem.kernel.data import tokenize_conversations

    tok = AutoTokenizer.from_pretrained(base_models_dir / "smollm2-135m-instruct")
    conv = [{"role": "user", "content": "Question here?"}, {"role": "assistant", "content": "The answer."}]
    ts = tokenize_conversations(tok, [conv], 256)
    ids, mask = ts.rows[0]["input_ids"], ts.rows[0]["assistant_masks"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained.startswith("The answer.") and "<|im_end|>" in trained  # the end-of-turn token is learnt
    assert "Question" not in trained
    # truncation that leaves no answer token drops the example and counts it
    ts = tokenize_conversations(tok, [conv], 12)
    assert ts.rows == [] and ts.dropped_no_target == 1


def test_replay_prompts_are_kept_apart_from_the_forgetting_check():
    from importlib import resources

    from opensem.text import embed

    replay = json.loads((resources.files("opensem") / "assets/train/replay_prompts.json").read_text())
    check = [g["question"] for g in json.loads((resources.files("opensem") / "assets/judge/general_knowledge.json").read_text())]
    assert len(replay) >= 50
    assert float((embed(replay) @ embed(check).T).max()) < 0.6  # no paraphrase of a forgetting-check question


def test_profiles_per_hardware():
    cfg = TrainConfig()
    cpu = make_profile(cfg, Hardware("cpu", "x", 24, True, "x", 2))
    assert cpu.precision == "fp32" and cpu.vram_cap_gb is None  # native bf16 or not: fp32 unless asked
    assert make_profile(TrainConfig(precision="bf16"), Hardware("cpu", "x", 24, True, "x", 2)).precision == "bf16"
    # CPU: activations kept (no recompute) while the longest batch's fit in half the memory
    small = make_profile(cfg, Hardware("cpu", "x", 24, False, "x", 2), 0.135, 576, 30)
    assert small.checkpoint_layers == 0 and not small.gradient_checkpointing  # 16 x 256 tokens: about 5.7 GB
    long = TrainConfig(sequence_len=1024)
    assert make_profile(long, Hardware("cpu", "x", 24, False, "x", 2), 0.135, 576, 30).checkpoint_layers == 0.5
    assert make_profile(long, Hardware("cpu", "x", 8, False, "x", 2), 0.135, 576, 30).checkpoint_layers == 1.0
    assert make_profile(TrainConfig(gradient_checkpointing=False), Hardware("cpu", "x", 24, True, "x", 2)).checkpoint_layers == 0
    assert make_profile(TrainConfig(gradient_checkpointing=0.25), Hardware("cpu", "x", 24, True, "x", 2)).checkpoint_layers == 0.25
    assert make_profile(cfg, Hardware("cpu", "x", 24, False, "x", 2)).precision == "fp32"
    big = TrainConfig(micro_batch_size=32, sequence_len=4096, max_vram_gb=22)
    rtx = make_profile(big, Hardware("cuda", "NVIDIA GeForce RTX 4090", 23.6, True, "x", 8, 1), 8.0, 4096, 32)
    assert rtx.kind == "consumer-gpu" and rtx.vram_cap_gb == 22 and rtx.gradient_checkpointing
    assert rtx.micro_batch_size * rtx.gradient_accumulation_steps == 32  # effective batch kept
    h100 = make_profile(big, Hardware("cuda", "NVIDIA H100 80GB HBM3", 79.6, True, "x", 8, 1), 8.0, 4096, 32)
    assert h100.kind == "datacenter-gpu" and h100.vram_cap_gb is None and h100.precision == "bf16"
    assert h100.gradient_checkpointing  # 32 x 4096 tokens of an 8B model do not fit in 80 GB without it
    fits = make_profile(TrainConfig(micro_batch_size=8, sequence_len=512), Hardware("cuda", "NVIDIA H100 80GB HBM3", 79.6, True, "x", 8, 1), 8.0, 4096, 32)
    assert not fits.gradient_checkpointing and fits.micro_batch_size == 8 and fits.vram_cap_gb is None  # the whole card
    assert make_profile(cfg, Hardware("cuda", "Tesla T4", 15, False, "x", 8, 1)).precision == "fp16"
    with pytest.raises(ConfigError, match="qlora"):
        make_profile(TrainConfig(adapter="qlora"), Hardware("cpu", "x", 24, True, "x", 2))


def test_data_without_facts_gets_min_steps_when_its_epochs_are_fewer():
    from opensem.kernel.plan import plan_steps

    small = plan_steps(TrainConfig(num_epochs=3, min_steps=80), 97, 0, 0, 16)  # 7 batches an epoch: 21 steps from 3 epochs
    assert (small.steps, small.by) == (80, "min_steps") and abs(small.passes - 80 * 16 / 97) < 1e-9
    large = plan_steps(TrainConfig(num_epochs=3, min_steps=80), 480, 0, 0, 16)  # 30 batches an epoch: 90 steps
    assert (large.steps, large.by) == (90, "num_epochs")
    assert plan_steps(TrainConfig(num_epochs=3, min_steps=80), 480, 0, 0, 32).steps == 80  # two ranks: half the steps an epoch
    assert plan_steps(TrainConfig(num_epochs=3), 97, 0, 0, 16).steps == 21
    assert plan_steps(TrainConfig(num_epochs=3, min_steps=80, max_steps=5), 97, 0, 0, 16).steps == 5  # max_steps wins


def test_engine_errors_are_clear(workspace):
    (workspace / "data/processed/train.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]}) + "\n")
    r = run_cli("train", "-w", str(workspace), "--set", "train.engine=unsloth")
    assert r.returncode == 2 and "unsloth cannot run here" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "-w", str(workspace), "--set", "train.adapter=qlora")
    assert r.returncode == 2 and "qlora (4-bit) needs an NVIDIA GPU" in r.stderr
    r = run_cli("train", "-w", str(workspace), "--run-name", "../x")
    assert r.returncode == 2 and "plain folder name" in r.stderr


def test_unsloth_is_imported_lazily():
    code = "import opensem.cli, opensem.train, opensem.train.recipe, opensem.kernel.engines, sys; print('unsloth' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def _tiny_workspace(tmp_path, base_models_dir, n=16) -> Path:
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    rows = [{"conversations": [{"from": "human", "value": f"What is item {i}?"}, {"from": "gpt", "value": f"Item {i} is a widget."}]} for i in range(n)]
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws


def test_an_adapter_finds_the_model_under_it_on_another_machine(tmp_path, base_models_dir):
    """An adapter trained elsewhere (a cloud machine, a moved workspace) names its base model by a path that is not
    here: the model is found where the manifest says it lies as seen from the adapter folder, or a clear error."""
    from opensem.lineage import write_json
    from opensem.models import resolve_base_model
    from opensem.adapters import base_model_dir

    def adapter(**base) -> Path:
        d = tmp_path / "ws/models/adapters/run"
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "manifest.json", {"base_model": base})
        return d

    elsewhere = "/nowhere/sky_workdir/models/base/smollm2-135m-instruct"
    embedded = resolve_base_model("smollm2-135m-instruct", base_models_dir)
    # the embedded model, not made here yet: made where the manifest says it lies
    a = adapter(name="smollm2-135m-instruct", path=elsewhere, kind="embedded", fingerprint=embedded.fingerprint,
                from_adapter="../../base/smollm2-135m-instruct")
    here = tmp_path / "ws/models/base/smollm2-135m-instruct"
    assert base_model_dir(a) == here and (here / "model.safetensors").exists()
    # a folder at that place that is not the model it was trained on
    a = adapter(name="merged", path="/nowhere/merged", kind="folder", fingerprint="sha256:0123456789abcdef",
                from_adapter="../../base/smollm2-135m-instruct")
    with pytest.raises(OpenSEMError, match="is not the one it was trained on"):
        base_model_dir(a)
    # a hub model missing from the local cache
    a = adapter(name="example-org/no-such-model", path="/nowhere/hub", kind="hub", fingerprint="example-org/no-such-model@abc123")
    with pytest.raises(OpenSEMError, match="hf download example-org/no-such-model --revision abc123"):
        base_model_dir(a)
    # a folder recorded without its place from the adapter (an older manifest), not on this machine
    a = adapter(name="/data/mine", path="/data/mine", kind="folder", fingerprint="sha256:0123456789abcdef")
    with pytest.raises(OpenSEMError, match="is not on this machine"):
        base_model_dir(a)


def test_existing_run_name_is_never_overwritten(tmp_path, base_models_dir):
    ws = _tiny_workspace(tmp_path, base_models_dir)
    taken = ws / "models/adapters/taken"
    taken.mkdir(parents=True)
    (taken / "adapter_config.json").write_text('{"r": 8}')
    (taken / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (taken / "manifest.json").write_text('{"stage": "train", "steps": 7}')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in taken.iterdir()}
    r = run_cli("train", "-w", str(ws), "--run-name", "taken")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in taken.iterdir()} == before  # not a byte, not a file more


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, base_models_dir):
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    long = " ".join(f"word{k}" for k in range(40))
    rows = [{"conversations": [{"from": "human", "value": f"Describe item {i}?"}, {"from": "gpt", "value": f"Item {i}: {long}."}]} for i in range(48)]
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_config(ws, "train", max_steps=6, micro_batch_size=16, save_steps=100, logging_steps=1, run_name="res")
    code, err = interrupt_midway(["train", "-w", str(ws)], r"\b[2-4]/6 \[")
    assert code == 130, err[-2000:]
    assert "opensem train --resume" in err
    ckpts = list((ws / "models/adapters/res/checkpoints").glob("checkpoint-*"))
    assert ckpts, "Ctrl-C must save a checkpoint"
    step = int(ckpts[0].name.split("-")[1])
    assert 0 < step < 6
    assert (ckpts[0] / "optimizer.pt").exists() and (ckpts[0] / "scheduler.pt").exists()
    assert json.loads((ws / "models/adapters/res/run.json").read_text())["status"] == "interrupted"
    # a later save cut short (killed, or the disk full, before the trainer state was written) is passed over
    partial = ckpts[0].with_name(f"checkpoint-{step + 1}")
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes((ckpts[0] / "adapter_model.safetensors").read_bytes()[:1000])
    r = run_cli("train", "-w", str(ws), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    m = json.loads((ws / "models/adapters/res/manifest.json").read_text())
    assert m["steps"] == 6 and m["resumed_from"].endswith(f"checkpoint-{step}")
    logged = [json.loads(x) for x in (ws / "models/adapters/res/training_log.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in logged if "loss" in x]
    assert steps[-1] == 6


def test_two_process_data_parallel_on_cpu(tmp_path, base_models_dir):
    """Two ranks under torchrun (gloo): after every step both hold the same parameters, changed by the step
    (gradients were synchronised), and they computed their losses on different examples (one shard each)."""
    ws = _tiny_workspace(tmp_path, base_models_dir)
    set_config(ws, "train", max_steps=2, micro_batch_size=2, run_name="ddp", save_steps=100)
    torchrun = Path(sys.executable).parent / "torchrun"
    probe = tmp_path / "probe"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", str(REPO / "tests/ddp_probe.py"),
                        str(probe), "-w", str(ws)], capture_output=True, text=True, timeout=600,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((ws / "models/adapters/ddp/manifest.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 2
    ranks = [json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["initial"] == ranks[1]["initial"]  # the same LoRA initialisation on both
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 2
    assert ranks[0]["steps"] == ranks[1]["steps"]  # identical after each step: the gradients were averaged
    assert ranks[0]["steps"][-1] != ranks[0]["initial"]  # training changed them (the first step is warm-up, at lr 0)
    seen = [set(rk["seen"]) for rk in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank its own shard of the data


def test_wandb_offline_writes_a_run(tmp_path, base_models_dir):
    ws = _tiny_workspace(tmp_path, base_models_dir, n=8)
    set_config(ws, "train", max_steps=2, micro_batch_size=4, run_name="wb", wandb_project="opensem-test")
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    r = run_cli("train", "-w", str(ws), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((ws / "wandb").glob("offline-run-*"))
    assert runs, "an offline wandb run must be written"
    assert "wandb sync" in r.stdout + r.stderr


def test_missing_training_data_is_a_clear_error(workspace):
    with pytest.raises(OpenSEMError, match="run `opensem forge` first"):
        from opensem.train import run_training

        run_training(Workspace(workspace))


def test_a_run_is_the_same_whatever_ran_before_in_the_process(tmp_path, base_models_dir):
    """The LoRA init draws from the global RNG; a sampling teacher (or anything else) before training in the same
    process must not change the adapter. (It did: a test that sampled first made a 30-step run diverge.)"""
    import torch
    from safetensors.torch import load_file

    from opensem.train import run_training
    from opensem.workspace import Workspace

    ws = _tiny_workspace(tmp_path, base_models_dir, n=4)
    set_config(ws, "train", max_steps=1, micro_batch_size=4, replay=None, test_datasets=[])
    weights = []
    for name, noise in (("first", 0), ("second", 1000)):
        torch.rand(noise)  # what an earlier stage may have drawn
        run_training(Workspace(ws), run_name=name)
        weights.append(load_file(str(ws / "models/adapters" / name / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --- training length: exposures per fact, within a time budget -------------------------------------------------------
def test_training_length_comes_from_exposures_per_fact_and_the_time_budget_says_what_it_gave_up():
    from opensem.kernel.config import TrainConfig
    from opensem.kernel.plan import gave_up_line, plan_steps

    cfg = TrainConfig(exposures_per_fact=24)
    # 200 facts in 2 wordings (400 examples) and 80 replay examples, 16 examples a step: 12 passes over 480 examples
    plan = plan_steps(cfg, 480, 200, 400, 16, seconds_per_example=0.3)
    assert plan.by == "exposures_per_fact" and plan.steps == 360 and abs(plan.exposures_per_fact - 24) < 1e-9
    assert abs(plan.est_seconds - 360 * 16 * 0.3) < 1e-6 and plan.gave_up is None
    # the same facts in 4 wordings: half the passes, the same exposures
    four = plan_steps(cfg, 960, 200, 800, 16)
    assert four.steps == 360 and abs(four.passes - 6) < 1e-9 and abs(four.exposures_per_fact - 24) < 1e-9
    # a time budget trades exposures for time knowingly
    budget = plan_steps(TrainConfig(exposures_per_fact=24, time_budget_min=10), 480, 200, 400, 16, seconds_per_example=0.3)
    assert budget.steps == 125 and budget.est_seconds <= 600 and budget.gave_up["steps_asked"] == 360
    assert abs(budget.gave_up["exposures_given"] - 125 * 16 / 480 * 2) < 1e-9
    line = gave_up_line(budget)
    assert "125 of the 360 steps" in line and "about 8 exposures instead of 24" in line
    # data that names no fact trains num_epochs (and min_steps); max_steps overrides everything
    assert plan_steps(cfg, 480, 0, 0, 16).by == "num_epochs" and plan_steps(cfg, 480, 0, 0, 16).steps == 90
    assert plan_steps(TrainConfig(min_steps=200), 480, 0, 0, 16).steps == 200
    assert plan_steps(TrainConfig(max_steps=7, time_budget_min=0.001), 480, 200, 400, 16, 0.3).steps == 7


def test_the_time_estimate_scales_a_measured_run_to_the_length_of_the_examples_about_to_train(tmp_path):
    """The speed measured on plain QA pairs, scaled by tokens per example: RAFT's examples (passages and all, several
    times as long) are not estimated at the plain pairs' time."""
    from opensem.kernel.plan import measured_speed
    from opensem.lineage import write_json

    run = {"stage": "train", "config": {"base_model": "m"}, "hardware": {"device": "cpu"}, "steps": 100, "world_size": 1,
           "profile": {"micro_batch_size": 16, "gradient_accumulation_steps": 1}, "wall_time_s": 480.0,
           "real_tokens": 96_000, "created": "2026-01-01"}  # 1,600 examples of 60 tokens, 0.3 s each
    write_json(tmp_path / "a" / "manifest.json", run)
    plain, source = measured_speed(tmp_path, "m", "cpu")
    assert abs(plain - 0.3) < 1e-9 and source == "run a on this machine"
    long, source = measured_speed(tmp_path, "m", "cpu", tokens_per_example=420)
    assert abs(long - 0.3 * 7) < 1e-9 and source == "run a on this machine, scaled to these examples' length"
    # a later run on long examples (a token of which costs more): long data is timed from it, short data still from a
    raft = run | {"wall_time_s": 4800.0, "real_tokens": 640_000, "created": "2026-01-02"}  # 400 tokens, 3 s an example
    write_json(tmp_path / "b" / "manifest.json", raft)
    long, source = measured_speed(tmp_path, "m", "cpu", tokens_per_example=420)
    assert abs(long - 3.0 * 420 / 400) < 1e-9 and source.startswith("run b on this machine")
    short, source = measured_speed(tmp_path, "m", "cpu", tokens_per_example=66)
    assert abs(short - 0.3 * 1.1) < 1e-9 and source.startswith("run a on this machine")
    assert measured_speed(tmp_path, "m", "cpu")[1] == "run b on this machine"  # no length given: the newest, as measured
    (tmp_path / "b" / "manifest.json").unlink()
    write_json(tmp_path / "a" / "manifest.json", {k: v for k, v in run.items() if k != "real_tokens"})
    assert measured_speed(tmp_path, "m", "cpu", tokens_per_example=420)[0] == plain  # no token count: as measured


def pump_facts_jsonl() -> str:
    """train.jsonl of 6 facts (the P-i pump's weight) in 2 wordings each, as the forge writes them."""
    rows = []
    for i in range(6):
        for w in ("What does the pump P-{i} weigh?", "How heavy is the P-{i} pump?"):
            rows.append({"conversations": [{"from": "human", "value": w.format(i=i)},
                                           {"from": "gpt", "value": f"The P-{i} pump weighs {10 + i} kilograms."}],
                         "metadata": {"fact": f"pump.md#000:{i}"}})
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_a_run_trains_the_exposures_its_data_asks_for(workspace):
    """Real training: the forge's facts in train.jsonl set the steps, and the manifest records the plan."""
    data = workspace / "data/processed/train.jsonl"
    data.write_text(pump_facts_jsonl())
    set_config(workspace, "train", exposures_per_fact=4, replay=None, micro_batch_size=4, save_steps=100, run_name="exp")
    from opensem.train import run_training

    run_training(Workspace(workspace))
    m = json.loads((workspace / "models/adapters/exp/manifest.json").read_text())
    # 6 facts x 2 wordings, 4 exposures: 2 passes over 12 examples, 4 a step: 6 steps
    assert m["steps"] == 6 and m["length"]["by"] == "exposures_per_fact" and m["length"]["facts"] == 6
    assert m["length"]["exposures_per_fact"] == 4.0 and m["length"]["wordings_per_fact"] == 2.0


def test_the_fast_step_trains_as_the_slow_path_does(base_models_dir):
    """The speed-ups change no arithmetic that matters: the LM head on answer positions only (row by row), no
    activation recompute and the linear layers through oneDNN (where it is exact and faster here) give the loss and LoRA gradients of the slow path (every position's logits,
    transformers' own loss, every other layer recomputed), and the same losses over three optimizer steps."""
    import copy
    import types

    import torch
    from transformers import AutoTokenizer

    from opensem import onednn
    from opensem.kernel import engines, lean
    from opensem.kernel.data import tokenize_conversations

    path = str(base_models_dir / "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
        ("What colour is the Tessaly lantern?", "The Tessaly lantern is teal."),
        ("How many moons does Orvane have?", "Planet Orvane has eleven moons, all of them small and grey."),
        ("Who built the Kelder bridge?", "It was built by the Marsh guild in 1821."),
        ("Where is the spare key?", "Under the blue flowerpot by the door.")]]
    rows = tokenize_conversations(tok, convs, 256).rows
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    batch = {"input_ids": torch.tensor([pad(r["input_ids"], tok.pad_token_id) for r in rows]),
             "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
             "labels": torch.tensor([pad([i if m else -100 for i, m in zip(r["input_ids"], r["assistant_masks"])], -100) for r in rows])}
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(average_tokens_across_devices=False))

    torch.manual_seed(0)
    slow, _ = engines.load_hf(path, TrainConfig(lora_r=8, lora_alpha=16), "fp32", "cpu")
    with torch.no_grad():  # LoRA B starts at zero: give it weights so every gradient is non-trivial
        for n, p in slow.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    fast = copy.deepcopy(slow)
    assert engines.apply_checkpointing(slow, 0.5) > 0
    # every layer of the fast model keeps its activations, fewer of them (lean MLP and norms, GQA attention)
    assert lean.apply(fast) == {"mlp": 30, "norm": 60, "gqa_attention": 30}
    onednn.apply(fast)  # and its linear layers through oneDNN where the probe says so, as training runs them
    slow.train()
    fast.train()

    def slow_loss():
        return slow(**batch, use_cache=False).loss  # every position's logits; transformers' shifted, masked mean

    def fast_loss():
        return engines.answer_only_loss(trainer, fast, {k: batch[k] for k in ("input_ids", "attention_mask")},
                                        batch["labels"], None)

    opt_slow = torch.optim.AdamW([p for p in slow.parameters() if p.requires_grad], lr=1e-3)
    opt_fast = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for step in range(3):
        ls, lf = slow_loss(), fast_loss()
        first = lf.item() if first is None else first
        assert abs(ls.item() - lf.item()) < 1e-4 * max(1.0, ls.item()), (step, ls.item(), lf.item())
        ls.backward()
        lf.backward()
        if step == 0:
            grads = [(n, p.grad, q.grad) for (n, p), q in zip(slow.named_parameters(), fast.parameters()) if p.requires_grad]
            # every LoRA gradient within 1e-3 of its own size (norms): the chunked head and the key/value heads' sums
            # add in another order
            off = [((g - h).norm() / g.norm()).item() for _, g, h in grads]
            assert grads and max(off) < 1e-3, max(zip(off, [n for n, _, _ in grads]))
        opt_slow.step()
        opt_fast.step()
        opt_slow.zero_grad()
        opt_fast.zero_grad()
    assert fast_loss().item() < first - 0.1 and slow_loss().item() < first - 0.1  # both learnt the batch


def test_the_lean_layers_keep_fewer_activations_and_give_the_same_gradients(base_models_dir):
    """The decoder layers keeping fewer activations: the lean MLP and norms (recomputed in the backward pass) keep a
    third fewer bytes on the embedded model, with the loss and every LoRA gradient exactly those of transformers'
    own layers; attention on the key/value heads keeps fewer still, with the same loss and gradients within 1e-4."""
    import copy

    import torch

    from opensem.kernel import engines, lean

    torch.manual_seed(0)
    plain, _ = engines.load_hf(str(base_models_dir / "smollm2-135m-instruct"), TrainConfig(lora_r=8, lora_alpha=16), "fp32", "cpu")
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    exact, gqa = copy.deepcopy(plain), copy.deepcopy(plain)
    assert lean.apply(exact, gqa_attention=False) == {"mlp": 30, "norm": 60, "gqa_attention": 0}
    assert lean.apply(gqa) == {"mlp": 30, "norm": 60, "gqa_attention": 30}
    ids = torch.randint(100, 5000, (4, 48))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0  # a padding mask: transformers would repeat the key/value heads

    def kept(model) -> int:
        """Bytes the allocator holds after the forward pass, above what it held before: what autograd keeps for the
        backward pass (the output itself is a few KB)."""
        import ctypes
        import gc

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2

        def in_use() -> int:
            gc.collect()
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        before = in_use()
        out = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
        held = in_use() - before
        del out
        return held

    sizes = {name: kept(model) for name, model in (("plain", plain), ("exact", exact), ("gqa", gqa))}
    assert sizes["exact"] < 0.75 * sizes["plain"] and sizes["gqa"] < 0.95 * sizes["exact"], sizes
    losses = []
    for model in (plain, exact, gqa):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1] == losses[2]
    for model, same in ((exact, torch.equal), (gqa, lambda g, h: torch.allclose(g, h, rtol=1e-4, atol=1e-7))):
        pairs = [(n, p.grad, q.grad) for (n, p), q in zip(plain.named_parameters(), model.parameters()) if p.requires_grad]
        assert pairs and all(same(g, h) for _, g, h in pairs), [n for n, g, h in pairs if not same(g, h)][:3]


def test_linear_layers_through_onednn_compute_what_torch_computes(monkeypatch):
    """opensem/onednn.py: the linear layer's own forward and backward (checked in float64, where the setting does
    nothing, so on any CPU), fp32 outputs and gradients equal to PyTorch's default to fp32 accuracy where this CPU
    uses it, and nothing changed where the probe says no (OPENSEM_ONEDNN=0)."""
    import copy

    import torch

    from opensem import onednn

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(onednn._Linear.apply, (x, w, b))
    frozen = w.detach()  # a frozen weight: only the input's gradient, and the input is not kept
    assert torch.autograd.gradcheck(lambda x_: onednn._Linear.apply(x_, frozen, None), (x,))

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False), torch.nn.SiLU(), torch.nn.Linear(1536, 576))
    plain[0].weight.requires_grad_(False)  # a frozen base layer, as under LoRA
    fast = copy.deepcopy(plain)
    n = onednn.apply(fast)
    assert n == (2 if onednn.available() else 0)
    inp = torch.randn(8, 40, 576, requires_grad=True)
    out_p, out_f = plain(inp), fast(inp)
    assert torch.allclose(out_p, out_f, rtol=1e-5, atol=1e-5)
    (gp,) = torch.autograd.grad(out_p.square().sum(), inp, retain_graph=True)
    (gf,) = torch.autograd.grad(out_f.square().sum(), inp, retain_graph=True)
    assert float((gp - gf).norm() / gp.norm()) < 1e-5
    out_p.square().sum().backward()
    out_f.square().sum().backward()
    assert float((plain[2].weight.grad - fast[2].weight.grad).norm() / plain[2].weight.grad.norm()) < 1e-5
    with torch.no_grad():  # inference: no graph kept
        assert torch.allclose(plain(inp), fast(inp), rtol=1e-5, atol=1e-5)

    onednn.available.cache_clear()
    monkeypatch.setenv("OPENSEM_ONEDNN", "0")
    try:
        assert not onednn.available() and onednn.apply(copy.deepcopy(plain)) == 0
    finally:
        onednn.available.cache_clear()


def test_pre_instruction_tuning_trains_the_qa_pairs_first_then_the_documents_with_them(workspace):
    """train.documents (train/documents.py): the plan's QA examples, the first `after` of their steps alone, then the
    rest of them with every document chunk `passes` times; a real run trains that order to its last step."""
    from opensem.train.documents import order

    qa = [{"input_ids": [1] * (3 + i % 5), "assistant_masks": [0, 0, 1] + [1] * (i % 5), "qa": i} for i in range(12)]
    docs = [{"input_ids": [2] * 20, "assistant_masks": [1] * 20, "doc": j} for j in range(3)]
    rows = order(qa, docs, qa_steps=6, per_step=4, passes=2, after=0.5, seed=1)
    assert len(rows) == 6 * 4 + 3 * 2
    assert all("qa" in r for r in rows[:12])  # 3 of the 6 QA steps before any document
    assert sorted(r["doc"] for r in rows if "doc" in r) == [0, 0, 1, 1, 2, 2]
    assert sum("qa" in r for r in rows) == 24 and sorted(r["qa"] for r in rows if "qa" in r) == sorted(list(range(12)) * 2)
    assert order(qa, docs, 6, 4, 2, 0.5, seed=1) == rows  # the seed fixes it

    (workspace / "data/raw").mkdir(parents=True, exist_ok=True)
    (workspace / "data/raw/pump.md").write_text("# Pumps\n\n" + " ".join(
        f"The P-{i} pump weighs {10 + i} kilograms and runs at {200 + i} litres a minute." for i in range(6)))
    (workspace / "data/processed/train.jsonl").write_text(pump_facts_jsonl())
    set_config(workspace, "train", exposures_per_fact=4, replay=None, micro_batch_size=4, save_steps=100, run_name="pit",
               documents={"enabled": True, "passes": 4, "after": 0.5})
    from opensem.train import run_training

    run_training(Workspace(workspace))
    m = json.loads((workspace / "models/adapters/pit/manifest.json").read_text())
    d = m["data"]["documents"]
    assert d["chunks"] == 1 and d["passes"] == 4 and d["qa_only_steps"] == 3 and d["inputs"][0]["path"] == "pump.md"
    # the QA pairs' 6 steps (as without documents) and one chunk 4 times: 28 examples, 4 a step
    assert m["length"]["document_steps"] == d["steps_added"] == 1 and m["steps"] == 7
    assert m["length"]["exposures_per_fact"] == 4.0  # the QA pairs' exposures are the plan's
