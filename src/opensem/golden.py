"""The golden set (evals/golden_set.json): a list of {"question", "answer"} with optional id, tags, system.

It is never used for training: the forge only reads its questions to keep them (and close paraphrases)
out of train.jsonl and test.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opensem.encoding import read_text
from opensem.errors import OpenSEMError
from opensem.text import normalize


class GoldenItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = None
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    system: Optional[str] = None


class DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise DuplicateKey(k)
    return dict(pairs)


def load_golden(path: Path, required: bool = True) -> list[GoldenItem]:
    if not path.exists():
        if required:
            raise OpenSEMError(f"{path}: golden set not found: write a JSON list of {{\"question\", \"answer\"}} items there")
        return []
    try:
        data = json.loads(read_text(path), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise OpenSEMError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise OpenSEMError(f"{path}: nested too deeply: a golden set is a list of {{\"question\", \"answer\"}} items") from None
    except DuplicateKey as e:
        raise OpenSEMError(f"{path}: an item has the key {str(e)!r} twice: keep one") from None
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        data = data["items"]
    if not isinstance(data, list):
        raise OpenSEMError(f"{path}: expected a JSON list of {{\"question\", \"answer\"}} items")
    items: list[GoldenItem] = []
    for i, raw in enumerate(data):
        try:
            item = GoldenItem.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "item"
            raise OpenSEMError(f"{path}: item {i + 1}: key '{key}': {err['msg']}") from None
        if not item.question.strip() or not item.answer.strip():
            raise OpenSEMError(f"{path}: item {i + 1}: question and answer must not be blank")
        items.append(item.model_copy(update={"id": item.id or f"q{i + 1:03d}"}))
    ids = [it.id for it in items]
    dup_ids = sorted({x for x in ids if ids.count(x) > 1})
    if dup_ids:
        raise OpenSEMError(f"{path}: duplicate id(s) {', '.join(dup_ids)}: every item needs its own id")
    if required and not items:
        raise OpenSEMError(f"{path}: the golden set is empty")
    return items


def duplicate_questions(items: list[GoldenItem]) -> list[tuple[str, str]]:
    """Pairs of ids whose questions are the same after normalisation (reported as warnings)."""
    seen: dict[str, str] = {}
    dups = []
    for it in items:
        key = normalize(it.question)
        if key in seen:
            dups.append((seen[key], it.id))
        else:
            seen[key] = it.id
    return dups
