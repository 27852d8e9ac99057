"""Content hashes, library versions and manifests: what went into every artefact."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from opensem.errors import OpenSEMError


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def json_sha256(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def versions(*names: str) -> dict[str, str]:
    names = names or ("opensem", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "unsloth")
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


_REQUIRED = object()


def read_json(path: Path, default: Any = _REQUIRED) -> Any:
    """A JSON file we wrote. Missing: ``default`` (an error when no default is given). Present but corrupt
    (torn, edited, not UTF-8): always a one-line error naming the file, never a silent empty value."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if default is _REQUIRED:
            raise OpenSEMError(f"{path}: not found") from None
        return default
    except OSError as e:
        raise OpenSEMError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise OpenSEMError(f"{path}: corrupt (not UTF-8 text): restore it from a backup or delete it to redo what wrote it") from None
    except json.JSONDecodeError as e:
        raise OpenSEMError(f"{path}: corrupt JSON (line {e.lineno}: {e.msg}): restore it from a backup or delete it "
                           f"to redo what wrote it") from None
    except RecursionError:
        raise OpenSEMError(f"{path}: nested too deeply to be a record of ours: restore it from a backup or delete it") from None


def written_by(data_file: Path) -> Optional[Path]:
    """The manifest beside ``data_file`` that records it among its ``outputs`` by content hash (the stage run that
    wrote exactly this file), or None: a file edited since, or one that no stage wrote."""
    data_file = Path(data_file)
    if not data_file.is_file():
        return None
    sha = None
    for path in sorted(data_file.parent.glob("*manifest.json")):
        outputs = read_json(path, {}).get("outputs") if path.is_file() else None
        if isinstance(outputs, dict):
            sha = sha or file_sha256(data_file)
            if any(isinstance(o, dict) and o.get("sha256") == sha for o in outputs.values()):
                return path
    return None
