"""The GPU path cannot run on this CPU machine: its decisions and its calls into Unsloth and torch.cuda are
checked here with stand-ins for the GPU-only pieces (torch.cuda, the unsloth package); our own code runs."""

from __future__ import annotations

import sys
import types

import pytest
from rich.console import Console

from opensem.config import TrainConfig
from opensem.errors import OpenSEMError
from opensem.train import engines, hardware


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
