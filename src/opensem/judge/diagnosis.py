"""Why the fine-tuned model misses: its score on a sample of its own training questions beside its golden score,
and one line saying what that suggests.

A model that cannot answer the questions it was trained on has not learnt its data (train longer or fuller); one
that answers them but not the golden questions memorized its wordings without generalizing (more wordings of each
fact); and when the retrieval row is far ahead of both, retrieval is what carries the answers. The sample is taken
from the training files the adapter's manifest names (only while their hashes still match), answered in the same
batch as the golden set and scored by the same judge against the training answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opensem.errors import OpenSEMError
from opensem.lineage import file_sha256, read_json
from opensem.workspace import Workspace

MEMORIZED = 4.0  # mean judge score on its own training questions at or above which the data counts as learnt
GAP = 1.0  # own-questions mean minus golden mean at or above which it did not generalize
CARRIES = 0.5  # fine-tuned + retrieval minus fine-tuned (mean score) at or above which retrieval carries it


@dataclass
class OwnQuestion:
    id: str
    question: str
    answer: str
    system: Optional[str]


def training_sample(ws: Workspace, adapter_dir: Optional[Path], n: int, seed: int = 0) -> list[OwnQuestion]:
    """Up to ``n`` single-turn examples of the adapter's own training files, the same ones on every run."""
    from opensem.kernel.data import jsonl_records, to_messages

    if not adapter_dir or n <= 0:
        return []
    train = _dig(read_json(adapter_dir / "manifest.json", {}), "data", "train")
    files = [f for f in (train.get("files") or []) if isinstance(f, dict) and isinstance(f.get("path"), str)]
    pool: list[OwnQuestion] = []
    for f in files:
        path = ws.path(f["path"])
        if not path.resolve().is_relative_to(ws.root.resolve()) or not path.is_file() or file_sha256(path) != f.get("sha256"):
            continue  # outside the workspace, or changed since training: not the data this adapter saw here
        try:
            records = list(jsonl_records(path))
        except OpenSEMError:
            continue  # not training data this judge can read: no sample from it
        for line, rec in records:
            try:
                msgs = to_messages(rec, "conversations", f"{path}:{line}")
            except OpenSEMError:
                continue  # not a conversation (a preference pair, a document chunk): nothing to ask
            turns = [m for m in msgs if m["role"] != "system"]
            if [m["role"] for m in turns] != ["user", "assistant"]:
                continue
            system = next((m["content"] for m in msgs if m["role"] == "system"), None)
            pool.append(OwnQuestion(f"{f['path']}:{line}", turns[0]["content"], turns[1]["content"], system))
    return random.Random(seed).sample(pool, min(n, len(pool)))


def _dig(d, *keys) -> dict:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d if isinstance(d, dict) else {}


def own_record(judge, own: list[OwnQuestion], answers: dict[str, str], ecfg) -> dict:
    """The sample's answers scored against the training answers, and their summary."""
    from opensem.judge.report import summarize

    verdicts = judge.score_many([(o.question, o.answer, answers["own:" + o.id]) for o in own])
    items = [{"id": o.id, "question": o.question, "golden": o.answer, "output": answers["own:" + o.id], "score": v.score,
              "reason": v.reason, "error": v.error} for o, v in zip(own, verdicts)]
    return {"items": items, "summary": summarize(items, ecfg.pass_threshold, ecfg.bootstrap_samples, ecfg.seed)}


def line(result: dict, pass_threshold: int) -> Optional[str]:
    """What the two scores suggest, in one line (None without both)."""
    own = ((result.get("own_questions") or {}).get("summary") or {}).get("mean_score")
    golden = (result.get("summary") or {}).get("mean_score")
    if own is None or golden is None:
        return None
    said = f"Why it misses: {own:.2f} on {result['own_questions']['summary']['n']} of its own training questions, {golden:.2f} on the golden set"
    rag = ((result.get("retrieval") or {}).get("summary") or {}).get("mean_score")
    carries = rag is not None and rag - golden >= CARRIES
    if own < MEMORIZED:
        why = "it has not learnt its training data: train longer or fuller (train.exposures_per_fact, learning_rate)"
    elif own - golden >= GAP:
        why = ("it memorized its training wordings but does not generalize to new ones: more wordings per fact "
               "(forge generation.questions_per_sentence)")
    else:
        why = "it answers new wordings about as well as its own: what it misses is not in its training data"
    if carries:
        why += f"; retrieval carries it ({rag:.2f} with passages in the prompt)"
    return f"{said}: {why}."
