"""`opensem serve`: an exported run behind an OpenAI-compatible chat endpoint on 127.0.0.1.

    llama.cpp (default)   llama-cpp-python's server on the run's exported GGUF (the type asked for, else the smallest
                          that passed its round-trip check; exported and checked first if missing); the chat
                          template is the GGUF's own, and a request that leaves a decoding setting or the system
                          prompt out gets the judged one (opensem/export/llama_server.py).
    vllm                  on a CUDA machine with vLLM installed: the model under the adapter, the adapter served
                          with --enable-lora under the run's name.

Point any OpenAI client at the printed base URL, or ``provider: openai-compatible`` in our own configs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional


from opensem.adapters import MANIFEST, base_model_dir
from opensem.errors import OpenSEMError
from opensem.lineage import read_json
from opensem.terminal import Console


def _port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise OpenSEMError(f"--port {port}: 127.0.0.1:{port} is in use: pick another with --port") from None


def pick_gguf(ws, adapter_dir: Path, gguf_type: Optional[str], console: Console) -> Path:
    """The run's exported GGUF: the type asked for (exported now if missing), else the smallest one that passed its
    round-trip check (numbers, names and yes/no kept), else the first of gguf_types, exported now."""
    from opensem.export.stage import EXPORT_MANIFEST, export_folder, export_run
    from opensem.export.verify import passed

    cfg = ws.export_config()
    folder = export_folder(ws, adapter_dir)
    files = read_json(folder / EXPORT_MANIFEST, {}).get("files", {})
    ggufs = {f["type"]: f for k, f in files.items() if k.startswith("gguf:") and ws.path(f["path"]).exists()}
    good = sorted((f["bytes"], t) for t, f in ggufs.items() if passed(f))
    want = gguf_type or (good[0][1] if good else cfg.gguf_types[0])
    if want not in ggufs:
        console.print(f"no {want} GGUF exported for this run yet: exporting it")
        export_run(ws, adapter_dir, ["gguf"], [want], None, console)
        files = read_json(folder / EXPORT_MANIFEST)["files"]
    entry = files[f"gguf:{want}"]
    if not passed(entry):
        raise OpenSEMError(f"{entry['path']} failed its round-trip check ({entry['check']['rule']}): serve another type "
                           f"(--gguf-type), re-export it, or export with --no-verify to serve it anyway")
    return ws.path(entry["path"])


def llama_cpp_command(gguf: Path, port: int, alias: str, settings: dict, system: Optional[str], n_ctx: int = 4096,
                      retrieval: Optional[tuple[Path, Path]] = None) -> list[str]:
    """The served expert (opensem.export.llama_server): llama-cpp-python's server with the judged decoding settings;
    ``retrieval``: (workspace, the evaluated model's folder) to answer from the workspace's documents."""
    return [sys.executable, "-m", "opensem.export.llama_server", "--model", str(gguf), "--port", str(port), "--alias", alias,
            "--n_ctx", str(n_ctx), "--settings", json.dumps(settings)] + (["--system", system] if system else []) + \
        (["--workspace", str(retrieval[0]), "--checker", str(retrieval[1])] if retrieval else [])


def vllm_command(base: Path, adapter_dir: Path, port: int, alias: str) -> list[str]:
    rank = read_json(adapter_dir / "adapter_config.json", {}).get("r", 16)
    exe = shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")
    return [exe, "serve", str(base), "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
            "--lora-modules", f"{alias}={adapter_dir}", "--max-lora-rank", str(max(8, rank))]


def vllm_available() -> Optional[str]:
    """Why vLLM cannot serve here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm, on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and this machine has none: use --engine llama.cpp"
    return None


def serve_run(ws, adapter_dir: Path, port: int, engine: str, gguf_type: Optional[str], console: Console,
              retrieval: bool = False) -> int:
    from opensem.workspace import plain_name

    m = read_json(adapter_dir / MANIFEST)
    alias = plain_name(m.get("run_name"), "run_name", str(adapter_dir / MANIFEST))
    _port_free(port)
    if engine == "vllm":
        if retrieval:
            raise OpenSEMError("--retrieval is served with --engine llama.cpp (the exported GGUF)")
        why = vllm_available()
        if why:
            raise OpenSEMError(f"--engine vllm: {why}")
        if read_json(adapter_dir / "adapter_config.json", {}).get("modules_to_save"):
            raise OpenSEMError(f"--engine vllm: {alias} trains whole modules (lora_modules_to_save), which vLLM's LoRA "
                               f"serving cannot load: export --format merged and serve that folder with vLLM directly")
        cmd = vllm_command(base_model_dir(adapter_dir), adapter_dir, port, alias)
    else:
        if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("fastapi") is None:
            raise OpenSEMError("serving needs llama-cpp-python's server: pip install 'opensem[export]'")
        from opensem.export.llama_server import judged_settings

        answers = ws.eval_config().answers
        gguf = pick_gguf(ws, adapter_dir, gguf_type, console)
        model_dir = base_model_dir(adapter_dir)  # the model under the adapter: its tokenizer and context fit the passages
        if retrieval:
            from opensem.retrieval import Index

            index = Index.build(ws, console)  # built (and cached by the corpus's content) before the server starts
            console.print(f"retrieval: {len(index.passages)} passages of {ws.forge_config().input_dir}, top "
                          f"{ws.eval_config().retrieval.top_k}; sources come back as `sources`")
        cmd = llama_cpp_command(gguf, port, alias, judged_settings(answers), answers.system_prompt,
                                retrieval=(ws.root, Path(model_dir)) if retrieval else None)
        console.print(f"{gguf.name}: a request that leaves them out is answered as judged: temperature {answers.temperature}, "
                      f"at most {answers.max_new_tokens} tokens, no repeat penalty"
                      + (", the judged system prompt" if answers.system_prompt else ""))
    system = ws.eval_config().answers.system_prompt
    console.print(f"serving {alias} ({engine}) at base URL http://127.0.0.1:{port}/v1, model {alias!r}")
    console.print(f"  e.g. OpenAI(base_url='http://127.0.0.1:{port}/v1', api_key='none').chat.completions.create(model='{alias}', ...)")
    console.print(f"  in a config: provider: openai-compatible, base_url: http://127.0.0.1:{port}/v1, model: {alias}")
    if system and engine == "vllm":
        console.print(f"  the model was trained and evaluated with the system prompt {system!r}: send it as the first message")
    console.print("  Ctrl-C stops it")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # the server takes this process's place: Ctrl-C and kill reach it directly
    return 0  # not reached
