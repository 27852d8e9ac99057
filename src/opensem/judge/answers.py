"""The models under test answer the golden set: batched, and cached by (model, adapter, question, decoding)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from opensem.config import AnswerConfig, TrainConfig
from opensem.errors import OpenSEMError
from opensem.lineage import file_sha256, read_json
from opensem.llm.cache import atomic_write_text
from opensem.workspace import Workspace


def resolve_adapter(ws: Workspace, cfg: TrainConfig, name: Optional[str]) -> Path:
    """An adapter by name (models/adapters/NAME), by path, or the latest complete one."""
    adapters = ws.path(cfg.output_dir)
    if name:
        for cand in (Path(name).expanduser(), adapters / name):
            if (cand / "adapter_config.json").exists():
                return cand.resolve()
        raise OpenSEMError(f"--adapter {name!r}: no adapter (adapter_config.json) at that path or in {cfg.output_dir}/")
    done = [d for d in adapters.glob("*/") if (d / "adapter_config.json").exists() and (d / "manifest.json").exists()]
    if not done:
        raise OpenSEMError(f"no trained adapter in {cfg.output_dir}/: run `opensem train` first, or pass --adapter PATH")
    return max(done, key=lambda d: (read_json(d / "manifest.json", {}).get("created", ""), d.stat().st_mtime)).resolve()


def adapter_hash(adapter: Optional[Path]) -> Optional[str]:
    if adapter is None:
        return None
    weights = adapter / "adapter_model.safetensors"
    return file_sha256(weights) if weights.exists() else file_sha256(adapter / "adapter_config.json")


def conversation(question: str, system: Optional[str]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def generate_answers(
    ws: Workspace,
    model_path: str,
    model_fingerprint: str,
    adapter: Optional[Path],
    items: list[tuple[str, str, Optional[str]]],  # (id, question, item system prompt)
    acfg: AnswerConfig,
    progress=None,
) -> dict[str, str]:
    """Answers keyed by item id. Cached answers are reused; the rest are generated in batches."""
    cache = ws.state_dir / "cache" / "answers"
    ahash = adapter_hash(adapter)

    def key(q: str, system: Optional[str]) -> str:
        payload = {"model": model_fingerprint, "adapter": ahash, "system": system, "question": q,
                   "max_new_tokens": acfg.max_new_tokens, "temperature": acfg.temperature}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    answers: dict[str, str] = {}
    todo: list[tuple[str, str, Optional[str], str]] = []
    for item_id, q, system in items:
        system = system or acfg.system_prompt
        k = key(q, system)
        hit = read_json(cache / f"{k}.json")
        if hit is not None:
            answers[item_id] = hit["answer"]
            if progress:
                progress(1)
        else:
            todo.append((item_id, q, system, k))
    if todo:
        from opensem.inference import load_chat_model

        model = load_chat_model(model_path, str(adapter) if adapter else None)
        for start in range(0, len(todo), acfg.batch_size * 4):
            part = todo[start : start + acfg.batch_size * 4]
            outs = model.generate([conversation(q, s) for _, q, s, _ in part], max_new_tokens=acfg.max_new_tokens,
                                  temperature=acfg.temperature, batch_size=acfg.batch_size, progress=progress)
            for (item_id, q, _, k), o in zip(part, outs):
                answers[item_id] = o.text
                atomic_write_text(cache / f"{k}.json", json.dumps({"question": q, "answer": o.text}, ensure_ascii=False))
    return answers
