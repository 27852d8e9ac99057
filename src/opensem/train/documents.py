"""Pre-instruction-tuning: the documents themselves trained too, after the QA pairs (``train.documents``).

Jiang et al. 2024 ("Instruction-tuned Language Models are Better Knowledge Learners") find that a model learns a
document's facts better when it has first been trained on questions and answers, and then on the documents with
them, than when it reads the documents first (continued pre-training, then instruction tuning). Here, with
``documents.enabled``:

- the documents of forge_config.yaml's ``input_dir``, read and chunked by the forge's own ingest (no overlap), each
  chunk under its section heading, are training examples: next-token loss on every token, one end-of-text after;
- the run's QA examples are those the plan gives (the same exposures per fact as without documents); its first
  ``after`` share of steps trains them alone, then the rest of them and the chunks (each seen ``passes`` times)
  are shuffled together;
- the order is fixed here, batches grouped by length within windows, and the trainer takes it as it is.

The steps the documents add, their chunks, tokens and passes are in the plan and the adapter's manifest.
"""

from __future__ import annotations

import dataclasses
import math
import random

from opensem.forge.documents import chunk_document, read_documents
from opensem.errors import OpenSEMError
from opensem.kernel.run import Data
from opensem.lineage import file_sha256
from opensem.workspace import Workspace

WINDOW_BATCHES = 16  # batches whose examples are sorted by length together


def chunk_texts(ws: Workspace) -> tuple[list[str], list[dict]]:
    """The documents' chunks as training text (heading, then the chunk), and the documents read (path, sha256)."""
    fcfg = ws.forge_config()
    root = ws.path(fcfg.input_dir)
    docs, _ = read_documents(root)
    if not docs:
        raise OpenSEMError(f"{fcfg.input_dir}: no readable documents for train.documents: put them there, or set "
                           f"documents.enabled: false in configs/train_config.yaml")
    texts = []
    for d in docs:
        for c in chunk_document(d, fcfg.chunking.chunk_tokens, 0):
            texts.append(f"{c.heading}\n\n{c.text}" if c.heading and not c.text.startswith(c.heading) else c.text)
    return texts, [{"path": d.path, "sha256": file_sha256(root / d.path)} for d in docs]


def document_rows(tok, texts: list[str], sequence_len: int) -> tuple[list[dict], int]:
    """Each text as a row with the loss on every token; returns the rows and how many were cut to sequence_len."""
    rows, cut = [], 0
    for text in texts:
        ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        if len(ids) > sequence_len:
            ids, cut = ids[:sequence_len], cut + 1
        rows.append({"input_ids": ids, "assistant_masks": [1] * len(ids)})
    return rows, cut


def draws(n: int, total: int, rng: random.Random) -> list[int]:
    """``total`` indices into ``n`` items: whole shuffled passes, the last one cut."""
    out: list[int] = []
    while len(out) < total:
        idx = list(range(n))
        rng.shuffle(idx)
        out += idx
    return out[:total]


def by_length(rows: list[dict], per_step: int, rng: random.Random) -> list[dict]:
    """Rows in batches of similar length: windows of WINDOW_BATCHES batches sorted by length, the batches of each
    window shuffled."""
    out: list[dict] = []
    size = per_step * WINDOW_BATCHES
    for start in range(0, len(rows), size):
        window = sorted(rows[start:start + size], key=lambda r: len(r["input_ids"]), reverse=True)
        batches = [window[i:i + per_step] for i in range(0, len(window), per_step)]
        rng.shuffle(batches)
        out += [r for b in batches for r in b]
    return out


def order(qa: list[dict], docs: list[dict], qa_steps: int, per_step: int, passes: float, after: float,
          seed: int) -> list[dict]:
    """The whole run's examples in order: ``after`` of the QA steps on QA alone, then the rest of the QA examples
    and every document chunk ``passes`` times, shuffled together."""
    rng = random.Random(seed)
    picks = [qa[i] for i in draws(len(qa), qa_steps * per_step, rng)]
    cut = int(qa_steps * after) * per_step
    mixed = picks[cut:] + [docs[i] for i in draws(len(docs), round(len(docs) * passes), rng)]
    rng.shuffle(mixed)
    return by_length(picks[:cut], per_step, rng) + by_length(mixed, per_step, rng)


def apply(ws: Workspace, run, tok, data: Data, per_step: int) -> Data:
    """The run's data with the documents after the QA pairs, in the order it trains; the plan's steps updated."""
    cfg, plan = run.cfg, run.plan
    if cfg.max_steps:
        raise OpenSEMError("configs/train_config.yaml: key 'documents': pre-instruction-tuning sets the length from "
                           "the QA pairs' plan; remove max_steps, or set documents.enabled: false")
    texts, inputs = chunk_texts(ws)
    docs, cut = document_rows(tok, texts, cfg.sequence_len)
    d, qa_steps = cfg.documents, plan.steps
    rows = order(data.train.rows, docs, qa_steps, per_step, d.passes, d.after, cfg.seed)
    doc_tokens = sum(len(r["input_ids"]) for r in docs)
    if plan.est_seconds:  # the documents' tokens at the QA examples' speed per token
        plan.est_seconds += plan.est_seconds * doc_tokens * d.passes / max(1, data.train.tokens * plan.passes)
    plan.steps = math.ceil(len(rows) / per_step)
    plan.document_steps = plan.steps - qa_steps
    run.say(f"documents: {len(docs)} chunks ({doc_tokens} tokens, {cut} cut to sequence_len) x {d.passes:g} passes, "
            f"after {int(qa_steps * d.after)} steps on the QA pairs alone: {plan.document_steps} more steps, "
            f"{plan.steps} in all")
    record = {"chunks": len(docs), "tokens": doc_tokens, "cut": cut, "passes": d.passes, "after": d.after,
              "qa_only_steps": int(qa_steps * d.after), "steps_added": plan.document_steps, "inputs": inputs}
    return dataclasses.replace(data, order=rows, documents=record)
