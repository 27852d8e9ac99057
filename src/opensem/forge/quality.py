"""Quality gates for generated pairs: shape, grounding, duplicates, decontamination against the golden set."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from opensem.forge.config import QualityConfig
from opensem.forge.synthesis import NOT_STANDALONE, QUESTION_START
from opensem.text import content_words, embed, normalize, shingles

REASONS = (
    "malformed",
    "beyond_pairs_per_chunk",
    "not_a_question",
    "about_heading",
    "no_subject",
    "unknown_name",
    "unanswered",
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


def minhash(text: str, num_perm: int = 128):
    from datasketch import MinHash  # scipy underneath: loaded when the gates run, not with the command line

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


# words that ask about something without naming it: "What is the purpose of ...", "the current status of ..."
GENERIC = frozenset("""purpose history origin details detail information info type kind name names current state status
    maximum minimum number total time reason difference way thing things something anything people person
    overall general specific example role meaning definition description overview part use used new different
    available possible certain particular""".split())
NOT_A_QUESTION = re.compile(r"^(how about|what about|and |so |but |this is|that is|it is|there is)\b", re.I)
TWO_QUESTIONS = re.compile(r"\band (what|how|who|when|where|which|why) (is|are|was|were|does|do|can)\b", re.I)
ASKS_NUMBER = re.compile(r"\b(how (many|much|long|far|old|often|big|fast|early|late)|maximum|minimum|number of|amount of|cost|price|age)\b", re.I)
NUMBER = re.compile(r"\d|\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|"
                    r"hundred|thousand|dozen|half|once|twice|first|second|third|last|free|every|daily|weekly|yearly|annual)\b", re.I)
NAME = re.compile(r"(?<![.?!]\s)(?<!^)\b([A-Z][\w'-]*[A-Za-z0-9]|\d[\w.,-]*)")  # a capitalised word not first, or a number


def question_reason(q: str, answer: str, heading: str, chunk: str) -> Optional[str]:
    """Why a question that has the shape of one is still no good, or None; measured against hand labels (bench/question_gate.py):
    not a question ("How about ...", two questions in one), a name or number the source
    does not contain ("What is the T-1000?"), about the section heading rather than a fact ("What is the purpose of
    getting started?"), no subject ("What is the route?"), and a quantity asked of an answer that gives none."""
    if NOT_A_QUESTION.match(q) or TWO_QUESTIONS.search(q):
        return "not_a_question"  # or two questions in one
    words = [w for w in content_words(q) if w not in GENERIC]
    src = set(content_words(chunk)) | set(content_words(heading))
    names = [m.group(1) for m in NAME.finditer(q)]
    if any(not set(content_words(n)) <= src for n in names if content_words(n)):
        return "unknown_name"
    head = set(content_words(heading.split(">")[-1])) if heading else set()
    if words and head and set(words) <= head and not set(words) & (set(content_words(answer)) - head):
        return "about_heading"
    if not set(words) & set(content_words(answer)):
        return "no_subject"  # nothing it names is in the answer
    if len(words) < 2 and not names:
        return "no_subject"  # one common noun: "What is a port?"
    if ASKS_NUMBER.search(q) and not NUMBER.search(answer):
        return "unanswered"  # asks how many / how long / the maximum, and the answer gives no quantity
    return None


class Gate:
    """Keeps a pair or names why not. Order: shape, grounding, golden overlap, exact dup, near dup."""

    def __init__(self, cfg: QualityConfig, golden_questions: list[str]):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.rejected: Counter = Counter()
        self.examples: dict[str, list[dict]] = defaultdict(list)
        self.seen: set[str] = set()
        self.lsh = MinHashLSH(threshold=cfg.near_duplicate_threshold, num_perm=128)  # questions
        self.lsh_qa = MinHashLSH(threshold=cfg.near_duplicate_threshold, num_perm=128)  # question + answer
        self.fact_of: dict[str, str] = {}
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

    def filter(self, pairs: list[Pair], chunk_text: dict[str, str], headings: Optional[dict[str, str]] = None) -> list[Pair]:
        kept: list[Pair] = []
        survivors: list[Pair] = []
        for p in pairs:
            reason = shape_reason(p.question, p.answer, self.cfg)
            if reason is None and self.cfg.question_gate:
                reason = question_reason(p.question, p.answer, (headings or {}).get(p.chunk_id, ""), chunk_text[p.chunk_id])
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
            # a near copy of another wording of the same fact ("What is error code E44?" and "What is error code E57?"
            # ask about two facts and both stay); a teacher's own pairs (passage strategy) name no fact beyond their
            # answer, so there a near copy of question and answer together is one too
            mh, mh_qa = minhash(p.question), minhash(p.question + " " + p.answer)
            fact = p.meta.get("fact") or p.answer
            sentence_fact = "variant" in p.meta
            if any(self.fact_of[k] == fact for k in self.lsh.query(mh)) or (not sentence_fact and self.lsh_qa.query(mh_qa)):
                self._reject("near_duplicate", p)
                continue
            self.seen.add(key)
            self.lsh.insert(f"p{self.n}", mh)
            self.lsh_qa.insert(f"p{self.n}", mh_qa)
            self.fact_of[f"p{self.n}"] = fact
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


def held_out(fact: str, seed: int, ratio: float) -> bool:
    """Whether ``fact`` gives a wording to test.jsonl: a stable draw per fact and seed, true for about
    ``ratio`` of the facts, the same at planning time and at split time."""
    h = hashlib.sha256(f"{seed}\x00{fact}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < ratio


def split_by_wording(pairs: list[Pair], test_ratio: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Every fact is trained. A held-out fact (``held_out``) that has two wordings or more gives its last one
    (a sampled wording; the greedy one trains) to test.jsonl, so the eval loss measures recall of a trained
    fact under a wording the model has not seen. No question is on both sides."""
    by_fact: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_fact[p.meta.get("fact") or p.chunk_id].append(p)
    test_ids: set[int] = set()
    for fact, wordings in by_fact.items():
        if len(wordings) >= 2 and held_out(fact, seed, test_ratio):
            test_ids.add(id(max(wordings, key=lambda p: p.meta.get("variant", 0))))
    train = [p for p in pairs if id(p) not in test_ids]
    train_questions = {normalize(p.question) for p in train}
    test = [p for p in pairs if id(p) in test_ids and normalize(p.question) not in train_questions]
    train += [p for p in pairs if id(p) in test_ids and normalize(p.question) in train_questions]
    return train, test


def coverage(facts: dict[str, str], train: list[Pair], test: list[Pair]) -> dict:
    """How many facts have at least one training wording, out of all facts (``facts``: id -> text); the
    wordings each trained fact has; the facts left with none."""
    trained = Counter(p.meta.get("fact") for p in train)
    missing = [f for f in facts if not trained.get(f)]
    n = len(facts)
    return {
        "facts": n,
        "trained": n - len(missing),
        "share": round((n - len(missing)) / n, 4) if n else None,
        "train_wordings_per_fact": round(sum(trained[f] for f in facts) / max(1, n - len(missing)), 2),
        "held_out_facts": len({p.meta.get("fact") for p in test}),
        "untrained": [{"fact": f, "text": facts[f][:160]} for f in missing[:50]],
    }
