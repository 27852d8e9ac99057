"""The models under test answer the golden set: batched, and cached by (model, adapter, question, decoding)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from opensem.adapters import adapter_hash
from opensem.judge.config import AnswerConfig
from opensem.inference import answer_cache_dir, answer_key, cached_answers
from opensem.workspace import Workspace


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
    ahash = adapter_hash(adapter)
    keys, requests = {}, []
    for item_id, q, system in items:
        system = system or acfg.system_prompt
        keys[item_id] = answer_key(model_fingerprint, ahash, system, q, acfg.max_new_tokens, acfg.temperature)
        requests.append((keys[item_id], conversation(q, system)))
    got = cached_answers(answer_cache_dir(ws), model_path, str(adapter) if adapter else None, requests,
                         acfg.max_new_tokens, acfg.temperature, acfg.batch_size, progress=progress)
    return {item_id: got[k]["answer"] for item_id, k in keys.items()}
