"""`opensem doctor`: what this machine has and what OpenSEM can do on it. Never prints a key's value."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from rich.table import Table

from opensem.terminal import Console

KEYS = ["OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "WANDB_API_KEY", "HF_TOKEN"]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cmd_version(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]) and not Path(cmd[0]).exists():
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                             env=os.environ | {"PROMPTFOO_DISABLE_TELEMETRY": "1", "PROMPTFOO_DISABLE_UPDATE": "1"})
        lines = [ln for ln in (out.stdout or out.stderr).strip().splitlines() if ln.strip()]
        return lines[0][:60] if lines else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "not working"


def run_doctor(workspace: Path, console: Console) -> dict:
    import torch

    from opensem.kernel.engines import unsloth_available
    from opensem.kernel.hardware import detect_hardware

    hw = detect_hardware()
    facts: dict[str, str] = {}
    facts["CPU"] = f"{hw.cpu} ({os.cpu_count()} cores, {hw.cpu_threads} torch threads)"
    if hw.device == "cuda":
        facts["GPU"] = f"{hw.name}, {hw.memory_gb:.1f} GB x {hw.gpu_count} ({hw.kind})"
        facts["CUDA"] = f"{torch.version.cuda}, bf16 {'yes' if hw.bf16 else 'no'}"
    else:
        facts["GPU"] = "none" if hw.device == "cpu" else hw.name
        facts["CUDA"] = "not available"
        facts["memory"] = f"{hw.memory_gb:.1f} GB RAM; CPU bf16 {'yes' if hw.bf16 else 'no'}"
    for pkg in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "unsloth", "sentence-transformers",
                "openai", "anthropic", "wandb"):
        facts[pkg] = _version(pkg)
    from opensem.judge.promptfoo import find_promptfoo

    facts["node"] = _cmd_version(["node", "--version"])
    try:
        pf = find_promptfoo(None, workspace)
        facts["promptfoo"] = _cmd_version(pf + ["--version"]).split("Node")[0]
    except Exception as e:
        facts["promptfoo"] = f"missing: {e}"
    ok, why = unsloth_available()
    facts["training engines"] = "hf" + (", unsloth" if ok else f" (unsloth: {why})")
    from opensem.llm.registry import PROVIDERS

    facts["teacher / judge providers"] = ", ".join(PROVIDERS.get(n).status() for n in PROVIDERS.names())
    from opensem.judge.scorers import SCORERS
    from opensem.stages import STAGES

    facts["judge scorers"] = ", ".join(SCORERS.names())
    from opensem.export.formats import FORMATS

    facts["export formats"] = ", ".join(FORMATS.names())
    facts["stages"] = ", ".join(STAGES.names())
    from opensem.text import embedder_path

    facts["offline judge"] = "ready (all-MiniLM-L6-v2 packaged)" if embedder_path() else "embedding model missing: token overlap only"
    facts["API keys set"] = ", ".join(k for k in KEYS if os.environ.get(k)) or "none"
    usage = shutil.disk_usage(workspace if workspace.exists() else Path.cwd())
    facts["free disk"] = f"{usage.free / 2**30:.1f} GB at {workspace.resolve()}"
    table = Table(title="opensem doctor", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for k, v in facts.items():
        table.add_row(k, v)
    console.print(table)
    return facts
