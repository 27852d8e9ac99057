"""The models under test answer the golden set: batched, and cached by (model, adapter, question, decoding)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from opensem.config import AnswerConfig, TrainConfig
from opensem.errors import OpenSEMError
from opensem.lineage import file_sha256, read_json
from opensem.inference import answer_key, cached_answers
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
    ahash = adapter_hash(adapter)
    keys, requests = {}, []
    for item_id, q, system in items:
        system = system or acfg.system_prompt
        keys[item_id] = answer_key(model_fingerprint, ahash, system, q, acfg.max_new_tokens, acfg.temperature)
        requests.append((keys[item_id], conversation(q, system)))
    got = cached_answers(ws.state_dir / "cache" / "answers", model_path, str(adapter) if adapter else None, requests,
                         acfg.max_new_tokens, acfg.temperature, acfg.batch_size, progress=progress)
    return {item_id: got[k]["answer"] for item_id, k in keys.items()}
