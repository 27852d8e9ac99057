"""Greedy answers from a GGUF in llama.cpp's runtime (llama-cpp-python), in a child process.

The chat template applied is the one inside the GGUF (what llama-server and Ollama read), not ours. The child
process keeps a crash in native code from taking the caller with it: it becomes a one-line error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opensem.errors import OpenSEMError

AMX_HINT = ("a llama-cpp-python compiled with -march=native can crash on CPUs with AMX: rebuild it portable, "
            "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' "
            "pip install --force-reinstall --no-cache-dir llama-cpp-python (make setup does this)")


@dataclass
class GgufAnswers:
    answers: list[str]
    completion_tokens: int
    seconds: float  # decoding time, model load excluded

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def answers(gguf: Path, conversations: list[list[dict]], max_new_tokens: int, lora: Optional[Path] = None,
            n_ctx: int = 2048, timeout: int = 1800) -> GgufAnswers:
    """Each conversation answered greedily by the GGUF (and a GGUF LoRA on top, if given)."""
    job = {"model": str(gguf), "lora": str(lora) if lora else None, "conversations": conversations,
           "max_new_tokens": max_new_tokens, "n_ctx": n_ctx}
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "opensem.llamacpp"], input=json.dumps(job), capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise OpenSEMError(f"{gguf.name}: llama.cpp did not answer {len(conversations)} questions in {timeout} s") from None
    if r.returncode < 0:
        name = signal.Signals(-r.returncode).name
        raise OpenSEMError(f"{gguf.name}: llama.cpp crashed ({name}) while answering; {AMX_HINT}")
    if r.returncode != 0:
        last = ([x for x in r.stderr.splitlines() if x.strip()] or [f"exit code {r.returncode}"])[-1]
        raise OpenSEMError(f"{gguf.name}: llama.cpp could not answer: {last}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    return GgufAnswers(data["answers"], data["completion_tokens"], data["seconds"])


def _child() -> None:
    job = json.loads(sys.stdin.read())
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install 'opensem[export]'")
    llm = Llama(model_path=job["model"], lora_path=job["lora"], n_ctx=job["n_ctx"], seed=0, verbose=False,
                n_threads=os.cpu_count())
    out, tokens, spent = [], 0, 0.0
    for conv in job["conversations"]:
        t = time.perf_counter()
        r = llm.create_chat_completion(conv, temperature=0.0, max_tokens=job["max_new_tokens"])
        spent += time.perf_counter() - t
        out.append((r["choices"][0]["message"]["content"] or "").strip())
        tokens += r["usage"]["completion_tokens"]
    print(json.dumps({"answers": out, "completion_tokens": tokens, "seconds": spent}))


if __name__ == "__main__":
    _child()
