"""The GPU path cannot run on this CPU machine: its decisions and its calls into Unsloth and torch.cuda are
checked here with stand-ins for the GPU-only pieces (torch.cuda, the unsloth package); our own code runs."""

from __future__ import annotations

import sys
import types

import pytest
from rich.console import Console

from opensem.kernel.config import TrainConfig
from opensem.errors import OpenSEMError
from opensem.kernel import engines, hardware


def test_engine_choice(monkeypatch):
    console = Console(record=True)
    monkeypatch.setattr(engines, "unsloth_available", lambda: (True, "ok"))
    assert engines.choose_engine(TrainConfig(engine="auto"), console) == "unsloth"
    assert engines.choose_engine(TrainConfig(engine="hf"), console) == "hf"
    monkeypatch.setattr(engines, "unsloth_available", lambda: (False, "no NVIDIA GPU"))
    assert engines.choose_engine(TrainConfig(engine="auto"), console) == "hf"
    assert "Unsloth cannot run here: no NVIDIA GPU" in console.export_text()
    with pytest.raises(OpenSEMError, match="unsloth cannot run here"):
        engines.choose_engine(TrainConfig(engine="unsloth"), console)


def test_unsloth_engine_call_contract(monkeypatch):
    calls = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            calls["load"] = kw
            tok = types.SimpleNamespace(pad_token=None, eos_token="<|im_end|>")
            return "model", tok

        @staticmethod
        def get_peft_model(model, **kw):
            calls["peft"] = kw
            return "peft-model"

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    cfg = TrainConfig(adapter="qlora", lora_r=8, lora_alpha=16, sequence_len=1024, seed=7)
    model, tok = engines.load_unsloth("/models/x", cfg, "bf16", gradient_checkpointing=True)
    assert model == "peft-model" and tok.pad_token == "<|im_end|>"
    assert calls["load"]["load_in_4bit"] is True and calls["load"]["max_seq_length"] == 1024
    assert calls["peft"]["target_modules"] == engines.LINEAR_NAMES  # all-linear spelled out for Unsloth
    assert calls["peft"]["use_gradient_checkpointing"] == "unsloth" and calls["peft"]["random_state"] == 7


def test_vram_cap_sets_the_per_process_fraction(monkeypatch):
    import torch

    seen = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=24 * 2**30, name="RTX 4090"))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: seen.update(fraction=f, device=d))
    hw = hardware.Hardware("cuda", "NVIDIA GeForce RTX 4090", 24.0, True, "x", 8, 1)
    prof = hardware.make_profile(TrainConfig(), hw, 0.135, 576, 30)
    assert prof.kind == "consumer-gpu" and prof.vram_cap_gb == 22
    hardware.apply_vram_cap(prof)
    assert seen == {"fraction": pytest.approx(22 / 24), "device": 0}
    # a data-centre card is not capped
    seen.clear()
    hardware.apply_vram_cap(hardware.make_profile(TrainConfig(), hardware.Hardware("cuda", "NVIDIA A100-SXM4-80GB", 80, True, "x", 8, 1)))
    assert seen == {}


def test_unsloth_import_order_is_checked(monkeypatch, capsys):
    import transformers  # noqa: F401  (imported too early, on purpose)

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace())
    engines.import_unsloth_first()
    assert "imported before unsloth" in capsys.readouterr().err


def _fake_fast_model(calls: dict):
    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            calls["load"] = kw
            return "model", types.SimpleNamespace(pad_token="<pad>", eos_token="<|im_end|>")

        @staticmethod
        def get_peft_model(model, **kw):
            calls["peft"] = kw
            return "peft-model"

    return FastLanguageModel


def test_unsloth_continued_pretraining_contract(monkeypatch):
    """Unsloth's CPT recipe: embed_tokens / lm_head among the targets, rsLoRA; an adapter folder loads to train on."""
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=_fake_fast_model(calls)))
    cfg = TrainConfig(lora_modules_to_save=["embed_tokens", "lm_head"], peft_use_rslora=True)
    engines.load_unsloth("/models/x", cfg, "bf16", gradient_checkpointing=False)
    assert calls["peft"]["target_modules"] == engines.LINEAR_NAMES + ["embed_tokens", "lm_head"]
    assert calls["peft"]["use_rslora"] is True and calls["load"]["model_name"] == "/models/x"
    calls.clear()
    model, _ = engines.load_unsloth("/models/x", TrainConfig(lora_model_dir="/runs/cpt/a"), "bf16", gradient_checkpointing=False)
    assert calls["load"]["model_name"] == "/runs/cpt/a" and "peft" not in calls and model == "model"


def test_unsloth_trainer_gets_the_embedding_learning_rate(monkeypatch, base_models_dir, tmp_path):
    """On the unsloth engine the trainer is built on UnslothTrainer with UnslothTrainingArguments(embedding_learning_rate)."""
    from dataclasses import dataclass, field

    from trl import SFTConfig, SFTTrainer

    from opensem.kernel import run as recipe
    from opensem.kernel.data import TokenizedSet

    @dataclass
    class UnslothTrainingArguments(SFTConfig):
        embedding_learning_rate: float = field(default=None)

    class UnslothTrainer(SFTTrainer):
        pass

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(UnslothTrainer=UnslothTrainer,
                                                                       UnslothTrainingArguments=UnslothTrainingArguments))
    cfg = TrainConfig(lora_modules_to_save=["lm_head"], learning_rate=2e-4, embedding_learning_rate=3e-5, lora_r=4)
    model, tok = engines.load_hf(str(base_models_dir / "smollm2-135m-instruct"), cfg, "fp32", "cpu")
    run = recipe.Run(cfg, tmp_path / "run", True, 1, lambda *a, **k: None, engine="unsloth")
    hw = hardware.Hardware("cpu", "cpu", 16, False, "x", 2)
    prof = hardware.make_profile(cfg, hw, 0.135, 576, 30)
    rows = [{"input_ids": [1, 2, 3], "assistant_masks": [1, 1, 1]}]
    trainer = recipe.make_trainer(None, run, prof, hw, model, tok, recipe.Data(TokenizedSet(rows, 0, 0), None, 0, [], []))
    assert isinstance(trainer, UnslothTrainer) and isinstance(trainer.args, UnslothTrainingArguments)
    assert trainer.args.embedding_learning_rate == 3e-5 and trainer.args.learning_rate == 2e-4
    assert trainer.create_optimizer().param_groups[0]["lr"] == 2e-4  # Unsloth's own optimizer, not our parameter group


def test_unsloth_preference_tuning_patches_trl_before_the_model_loads(monkeypatch, tmp_path, base_models_dir, memorised_adapter):
    """On the unsloth engine: Unsloth imported first, PatchDPOTrainer() applied, then Unsloth loads the merged SFT model."""
    import shutil

    from conftest import make_workspace

    from opensem.prefs import recipe as prefs_recipe
    from opensem.workspace import Workspace

    order: list[str] = []

    class Loaded(Exception):
        pass

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            order.append(f"load {kw['model_name']}")
            raise Loaded()

    fake = types.SimpleNamespace(FastLanguageModel=FastLanguageModel, PatchDPOTrainer=lambda: order.append("patch"))
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    monkeypatch.setattr(engines, "unsloth_available", lambda: (True, "ok"))
    monkeypatch.setattr(engines, "import_unsloth_first", lambda: order.append("import"))
    monkeypatch.setattr(prefs_recipe, "detect_hardware", lambda: hardware.Hardware("cuda", "NVIDIA H100", 80, True, "x", 16, 1))
    from opensem.kernel import run as recipe

    monkeypatch.setattr(recipe, "apply_vram_cap", lambda p: None)
    ws = make_workspace(tmp_path / "ws", base_models_dir)
    shutil.copytree(memorised_adapter, ws / "models/adapters/mem", ignore=shutil.ignore_patterns("merged"))
    with pytest.raises(Loaded):
        prefs_recipe.run_preference(Workspace(ws), ws / "models/adapters/mem")
    assert order == ["import", "patch", f"load {ws / 'models/adapters/mem/merged'}"]


def test_the_unsloth_engine_trains_on_the_same_answer_only_loss(base_models_dir):
    """Unsloth's forward ignores logits_to_keep (it returns every position's logits) and computes its own fused loss
    from labels. The unsloth engine's loss hands it the labels; the hf engine's loss copes with a forward that returns
    every position. On the real model, both give the hf engine's answer-only loss."""
    import torch

    model, tok = engines.load_hf(str(base_models_dir / "smollm2-135m-instruct"), TrainConfig(lora_r=4), "fp32", "cpu")
    rows = []
    for q, a in [("What colour is the Tessaly lantern?", "The Tessaly lantern is teal."),
                 ("How many moons does Orvane have?", "Planet Orvane has eleven moons, all of them small.")]:
        prompt = tok(q + "\n", add_special_tokens=False)["input_ids"]
        answer = tok(a, add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in rows]),
             "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
             "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])}
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())

    class KeepsEveryPosition(torch.nn.Module):  # Unsloth's forward: logits_to_keep as a tensor is ignored
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, logits_to_keep=0, **kwargs):
            return self.inner(**kwargs)

    def loss(engine: str, m, n_items):
        trainer = types.SimpleNamespace(real_tokens=0, args=types.SimpleNamespace(average_tokens_across_devices=False))
        with torch.no_grad():
            return float(engines.make_trainer_class(engine).compute_loss(trainer, m, dict(batch), num_items_in_batch=n_items))

    model.eval()
    for n_items in (None, torch.tensor(answer_tokens)):
        ours = loss("hf", model, n_items)
        assert abs(loss("hf", KeepsEveryPosition(model), n_items) - ours) < 1e-5
        assert abs(loss("unsloth", model, n_items) - ours) < 1e-4, (loss("unsloth", model, n_items), ours)
