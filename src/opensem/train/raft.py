"""RAFT (Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific RAG"): the model is trained on the
prompt it will be asked with retrieval, so that it learns to answer from the right passage and to ignore the others.

Every forge example (its question, its grounded answer, and the chunk it was written from: ``metadata.chunk_id``)
becomes the prompt the judge's "+ retrieval" row uses (opensem.retrieval: the same index of data/raw, template and
``top_k`` of eval_config.yaml):

    with probability ``p`` (RAFT's P)   the source chunk (the "oracle") and the top_k - 1 most similar other chunks
    otherwise                           the top_k most similar chunks that are not the source ("distractors only")

each set in the order retrieval ranks them, so the model sees what retrieval would show it. The answer stays the
grounded one. An example that names no chunk (your own JSONL) is left as it is. The golden questions stay out of
training as before: the forge already dropped pairs that resemble them.

    # configs/train_config.yaml
    raft: {enabled: true, p: 0.8}       # and sequence_len: 1024 or more, so the passages fit
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from opensem.kernel.data import jsonl_records
from opensem.retrieval import Index, prompt
from opensem.workspace import Workspace


def chunk_ids(path: Path) -> list:
    """The source chunk of each example (``metadata.chunk_id``, written by the forge), in file order; None if none."""
    out = []
    for _, rec in jsonl_records(path):
        meta = rec.get("metadata") if isinstance(rec, dict) else None
        out.append(meta.get("chunk_id") if isinstance(meta, dict) else None)
    return out


def raft_conversations(index: Index, convs: list[list[dict]], sources: list, top_k: int, p: float, seed: int) -> tuple[list, dict]:
    """Each conversation's last question put in the retrieval prompt, with its source chunk at the share ``p``.
    Returns the conversations and the counts (with the source, distractors only, left as they were)."""
    from opensem.text import embed

    position = {q.id: j for j, q in enumerate(index.passages)}
    asked = [i for i, (c, s) in enumerate(zip(convs, sources)) if s in position and any(m["role"] == "user" for m in c)]
    questions = [[m for m in convs[i] if m["role"] == "user"][-1]["content"] for i in asked]
    ranked = np.argsort(-(embed(questions) @ index.vectors.T), axis=1) if questions else []
    rng = random.Random(seed)
    out, counts = [list(c) for c in convs], {"with_source": 0, "distractors_only": 0, "unchanged": len(convs) - len(asked)}
    for i, question, order in zip(asked, questions, ranked):
        oracle = position[sources[i]]
        others = [int(j) for j in order if j != oracle]
        with_source = rng.random() < p
        chosen = set(others[: top_k - 1] + [oracle]) if with_source else set(others[:top_k])
        passages = [index.passages[j] for j in order if j in chosen]  # in retrieval's order
        counts["with_source" if with_source else "distractors_only"] += 1
        last = max(k for k, m in enumerate(out[i]) if m["role"] == "user")
        out[i][last] = {"role": "user", "content": prompt(question, passages)}
    return out, counts


def apply(ws: Workspace, cfg, parts: list[tuple[Path, list[list[dict]]]], say) -> tuple[list[list[list[dict]]], dict]:
    """RAFT over every data file (train and test alike), one index; the record the manifest keeps."""
    ecfg = ws.eval_config()
    index = Index.build(ws)
    out, total = [], {"with_source": 0, "distractors_only": 0, "unchanged": 0}
    for n, (path, convs) in enumerate(parts):
        convs, counts = raft_conversations(index, convs, chunk_ids(path), ecfg.retrieval.top_k, cfg.raft.p, cfg.seed + n)
        out.append(convs)
        total = {k: total[k] + counts[k] for k in total}
    say(f"raft: {total['with_source']} examples with their source chunk and {ecfg.retrieval.top_k - 1} others, "
        f"{total['distractors_only']} with {ecfg.retrieval.top_k} other chunks only, {total['unchanged']} without a source chunk")
    return out, {"p": cfg.raft.p, "top_k": ecfg.retrieval.top_k, "index": index.key, **total}
