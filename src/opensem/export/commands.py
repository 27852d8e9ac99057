"""`opensem export` and `opensem serve`: a trained run as files for other runtimes, and as an endpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from opensem.commands import SetOpt, WorkspaceOpt, choices, console, open_workspace, out
from opensem.errors import OpenSEMError


def export(
    run_name: Annotated[Optional[str], typer.Argument(metavar="[RUN]", help="A run name (see `opensem runs`) or an adapter path; default: the latest")] = None,
    fmt: Annotated[Optional[list[str]], typer.Option("--format", help="merged | gguf | ollama | lora-gguf | retrieval | a plugin's | package.module:Class (repeatable; default: export_config.yaml's formats)")] = None,
    gguf_type: Annotated[Optional[list[str]], typer.Option("--gguf-type", help="f16, bf16, q8_0, q4_k_m, ... (repeatable; default: export_config.yaml's gguf_types)")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the round-trip check against the evaluated model")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """A trained run -> merged safetensors, GGUF, an Ollama Modelfile, a LoRA GGUF (models/exports/RUN), each checked
    against the evaluated model."""
    from opensem.export.config import GGUF_TYPE_NAMES
    from opensem.export.formats import FORMATS
    from opensem.export.stage import EXPORT_MANIFEST, export_result, export_run, find_run
    from opensem.lineage import read_json
    from opensem.stages import remember

    ws = open_workspace(workspace, sets, lock="export")
    fmts = None
    if fmt:  # a registered name, or package.module:Class for a format of your own
        choices("--format", [f for f in fmt if ":" not in f], FORMATS.names())
        fmts = list(dict.fromkeys(fmt))
    types = choices("--gguf-type", gguf_type, GGUF_TYPE_NAMES)
    folder = export_run(ws, find_run(ws, run_name), fmts, types, False if no_verify else None, console)
    remember(ws, export_result(ws, folder), "opensem export")
    for key, f in read_json(folder / EXPORT_MANIFEST).get("files", {}).items():
        check = f.get("check") or {}
        agree = f"agreement {check['agreement']:.2f}/5, {check['exact']:.0%} identical" if check else "not checked"
        out.print(f"{key:12} {f['path']}  {f['bytes'] / 1e6:.1f} MB  {f['seconds']:.1f} s  {agree}")


def serve(
    run_name: Annotated[Optional[str], typer.Argument(metavar="[RUN]", help="A run name or adapter path; default: the latest")] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1")] = 8000,
    engine: Annotated[str, typer.Option(help="llama.cpp (the exported GGUF) | vllm (merged base + --enable-lora, CUDA)")] = "llama.cpp",
    gguf_type: Annotated[Optional[str], typer.Option("--gguf-type", help="Which exported GGUF (default: the smallest that passed its check)")] = None,
    retrieval: Annotated[Optional[bool], typer.Option("--retrieval/--no-retrieval", help="Answer from data/raw with the judge's \"+ retrieval\" prompt, sources in the response (default: as the judge's recommended row)")] = None,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 for an exported run (exported first if needed), answering as
    the judge's recommended row (with or without retrieval) unless told otherwise."""
    from opensem.export.serve import serve_run
    from opensem.export.stage import find_run
    from opensem.verdict import answer_with_retrieval

    if engine not in ("llama.cpp", "vllm"):
        raise OpenSEMError(f"--engine {engine!r}: use llama.cpp or vllm")
    ws = open_workspace(workspace, sets)
    run = find_run(ws, run_name)
    use = answer_with_retrieval(ws, run, retrieval, console.print)
    if use and retrieval is None and engine == "vllm":
        console.print("[yellow]--engine vllm serves the model alone: the recommended row's retrieval is left out[/]")
        use = False
    sys.exit(serve_run(ws, run, port, engine, gguf_type, console, use))


def push(
    run_name: Annotated[Optional[str], typer.Argument(metavar="[RUN]", help="A run name or adapter path; default: the latest")] = None,
    repo: Annotated[str, typer.Option("--repo", help="The Hub repository, user/name or org/name (created if new)")] = "",
    what: Annotated[str, typer.Option("--what", help="adapter | merged | gguf (what `opensem export` made)")] = "adapter",
    private: Annotated[bool, typer.Option("--private", help="Create the repository private")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and print the model card; upload nothing")] = False,
    workspace: WorkspaceOpt = Path("."),
    sets: SetOpt = None,
):
    """A trained run to the Hugging Face Hub with its model card (token: HF_TOKEN or `hf auth login`, never written)."""
    from opensem.export.push import WHAT, push as push_run
    from opensem.export.stage import find_run

    if not repo:
        raise OpenSEMError("--repo: name the Hub repository, e.g. --repo your-name/pump-expert")
    choices("--what", [what], WHAT)
    ws = open_workspace(workspace, sets)
    push_run(ws, find_run(ws, run_name), repo, what, private, dry_run, console if not dry_run else out)
