"""Quality gates for generated pairs: shape, grounding, duplicates, decontamination against the golden set."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from datasketch import MinHash, MinHashLSH

from opensem.config import QualityConfig
from opensem.forge.synthesis import NOT_STANDALONE, QUESTION_START
from opensem.text import content_words, embed, normalize, shingles

REASONS = (
    "malformed",
    "not_standalone",
    "too_short",
    "too_long",
    "ungrounded",
    "exact_duplicate",
    "near_duplicate",
    "golden_overlap",
)


@dataclass
class Pair:
    question: str
    answer: str
    chunk_id: str
    chunk_sha: str
    source: str
    meta: dict = field(default_factory=dict)


def minhash(text: str, num_perm: int = 128) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1)
    for s in shingles(text):
        m.update(s.encode("utf-8"))
    return m


def grounding(answer: str, chunk_text: str) -> float:
    """Share of the answer's content words that occur in the source chunk."""
    words = content_words(answer)
    if not words:
        return 0.0
    source = set(content_words(chunk_text))
    return sum(w in source for w in words) / len(words)


def shape_reason(q: str, a: str, cfg: QualityConfig) -> Optional[str]:
    if not q or not a:
        return "malformed"
    if NOT_STANDALONE.search(q):
        return "not_standalone"
    if not q.endswith("?") or not QUESTION_START.match(q):
        return "malformed"
    if len(q) < cfg.min_question_chars or len(a) < cfg.min_answer_chars or len(q.split()) < 4:
        return "too_short"
    if len(q) > cfg.max_question_chars or len(a) > cfg.max_answer_chars:
        return "too_long"
    return None


class Gate:
    """Keeps a pair or names why not. Order: shape, grounding, golden overlap, exact dup, near dup."""

    def __init__(self, cfg: QualityConfig, golden_questions: list[str]):
        self.cfg = cfg
        self.rejected: Counter = Counter()
        self.examples: dict[str, list[dict]] = defaultdict(list)
        self.seen: set[str] = set()
        self.lsh = MinHashLSH(threshold=cfg.near_duplicate_threshold, num_perm=128)
        self.n = 0
        self.golden = [g for g in golden_questions if g.strip()]
        self.golden_lsh = MinHashLSH(threshold=cfg.golden_overlap_threshold, num_perm=128)
        for i, g in enumerate(self.golden):
            self.golden_lsh.insert(f"g{i}", minhash(g))
        self.golden_norm = {normalize(g) for g in self.golden}
        self.golden_vecs = embed(self.golden) if self.golden else None

    def _reject(self, reason: str, pair: Pair) -> None:
        self.rejected[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append({"question": pair.question, "answer": pair.answer[:200], "chunk": pair.chunk_id})

    def filter(self, pairs: list[Pair], chunk_text: dict[str, str]) -> list[Pair]:
        kept: list[Pair] = []
        survivors: list[Pair] = []
        for p in pairs:
            reason = shape_reason(p.question, p.answer, self.cfg)
            if reason is None:
                g = grounding(p.answer, chunk_text[p.chunk_id])
                p.meta["grounding"] = round(g, 3)
                if g < self.cfg.grounding_threshold:
                    reason = "ungrounded"
                elif not set(content_words(p.question)) & set(content_words(chunk_text[p.chunk_id])):
                    reason = "ungrounded"  # the question is about something the chunk does not mention
            if reason is None and self._golden_hit_lexical(p.question):
                reason = "golden_overlap"
            if reason:
                self._reject(reason, p)
            else:
                survivors.append(p)
        # paraphrases of golden questions, by meaning (embeddings), in one batch
        if survivors and self.golden_vecs is not None:
            vecs = embed([p.question for p in survivors])
            sims = (vecs @ self.golden_vecs.T).max(axis=1)
            for p, s in zip(survivors, sims):
                p.meta["golden_similarity"] = round(float(s), 3)
            flagged = [p for p, s in zip(survivors, sims) if s >= self.cfg.golden_embedding_threshold]
            for p in flagged:
                self._reject("golden_overlap", p)
            survivors = [p for p, s in zip(survivors, sims) if s < self.cfg.golden_embedding_threshold]
        for p in survivors:
            key = normalize(p.question) + "\x00" + normalize(p.answer)
            if key in self.seen:
                self._reject("exact_duplicate", p)
                continue
            mh = minhash(p.question)  # wordings of one fact share the answer: compare questions
            if self.lsh.query(mh):
                self._reject("near_duplicate", p)
                continue
            self.seen.add(key)
            self.lsh.insert(f"p{self.n}", mh)
            self.n += 1
            kept.append(p)
        return kept

    def _golden_hit_lexical(self, question: str) -> bool:
        if normalize(question) in self.golden_norm:
            return True
        return bool(self.golden) and bool(self.golden_lsh.query(minhash(question)))


def split_by_chunk(pairs: list[Pair], test_ratio: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic split; all pairs of one chunk land on the same side."""
    by_chunk: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_chunk[p.chunk_id].append(p)
    ids = sorted(by_chunk)
    random.Random(seed).shuffle(ids)
    target = round(len(pairs) * test_ratio)
    test_ids: set[str] = set()
    n_test = 0
    for cid in ids:
        if n_test >= target:
            break
        if len(test_ids) + 1 >= len(ids) and ids:  # never move every chunk to test
            break
        test_ids.add(cid)
        n_test += len(by_chunk[cid])
    train = [p for p in pairs if p.chunk_id not in test_ids]
    test = [p for p in pairs if p.chunk_id in test_ids]
    return train, test
