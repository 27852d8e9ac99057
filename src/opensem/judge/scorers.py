"""Judges: score a candidate answer 1-5 against the golden answer.

A scorer is any object with ``name`` (how reports label it), ``short`` and ``score_many(items) -> [Verdict]``
(the ``Scorer`` protocol below). Scorers register by name in ``SCORERS`` (opensem/plugins.py); eval_config.yaml's
``judge.provider`` names a registered scorer, a ``package.module:Class`` scorer, or else a provider, which
grades through ``LLMJudge``. Built in:

- ReferenceScorer ("offline"): no model call. Meaning (MiniLM embedding cosine), coverage of the golden
  answer's content words, and its key facts (numbers, names, yes/no), with a penalty when the candidate
  states a different number. Labelled as an offline reference scorer wherever it appears.
- LLMJudge: any provider (local, openai, anthropic, openai-compatible) with a 1-5 rubric, the explanation
  before the score, temperature 0, not told which model answered. An unparseable reply is an error
  (counted and reported), never a zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Protocol

from opensem.plugins import Registry
from opensem.text import STOPWORDS, content_words, embed, normalize, token_f1

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "fifteen": "15", "twenty": "20",
    "thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "once": "1", "twice": "2",
}
NEGATIONS = {"no", "not", "never", "none", "cannot", "isnt", "doesnt", "dont", "wont"}


@dataclass
class Verdict:
    score: Optional[float]  # 1-5; None when the judge failed
    reason: str
    error: Optional[str] = None


class Scorer(Protocol):
    name: str  # the label reports print: what graded the answers
    short: str  # the same, short (tables, file names)

    def score_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """items: (question, golden answer, candidate answer); one Verdict each, in order."""
        ...


SCORERS = Registry("scorer", "opensem.scorers", ("opensem.judge.scorers",),
                   lambda obj: callable(getattr(obj, "score_many", None)))


def numbers(text: str) -> set[str]:
    t = normalize(text.replace(",", ""))
    nums = set(re.findall(r"\d+(?:\.\d+)?", t))
    nums |= {NUMBER_WORDS[w] for w in t.split() if w in NUMBER_WORDS}
    return nums


def _names(text: str) -> set[str]:
    """Capitalised words and codes (E12, C-300, TC) that are not sentence-initial stopwords."""
    words = re.findall(r"\b[A-Z][A-Za-z0-9-]*\b", text)
    return {normalize(w) for w in words if normalize(w) not in STOPWORDS}


def stem(word: str) -> str:
    """Plural and simple verb endings only: 'bears' -> 'bear', 'monitors' -> 'monitor'."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _polarity(text: str) -> Optional[bool]:
    w = normalize(text).split()
    if not w:
        return None
    if w[0] == "yes":
        return True
    if w[0] == "no" or any(x in NEGATIONS for x in w[:6]):
        return False
    return None


@SCORERS.register(name="offline")
class ReferenceScorer:
    name = "offline reference scorer (embedding + key facts; not an LLM judge)"
    short = "offline-reference"
    version = "reference-scorer-v1"

    def score_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """items: (question, golden, candidate)."""
        cands = [c for _, _, c in items]
        golds = [g for _, g, _ in items]
        vecs = embed(cands + golds) if items else None
        out = []
        for i, (q, gold, cand) in enumerate(items):
            cos = None
            if vecs is not None:
                cos = float(vecs[i] @ vecs[len(items) + i])
            out.append(self._score(q, gold, cand, cos))
        return out

    def _score(self, question: str, gold: str, cand: str, cos: Optional[float]) -> Verdict:
        if not cand.strip():
            return Verdict(1.0, "empty answer")
        qwords = {stem(w) for w in content_words(question)}
        gold_words = [stem(w) for w in content_words(gold)]
        gold_words = [w for w in gold_words if w not in qwords] or gold_words
        cand_words = {stem(w) for w in content_words(cand)}
        coverage = sum(w in cand_words for w in gold_words) / len(gold_words) if gold_words else 0.0
        g_nums, c_nums = numbers(gold), numbers(cand)
        g_names = {stem(n) for n in _names(gold)} - qwords - {stem(normalize(w)) for w in re.findall(r"\b[A-Z][A-Za-z0-9-]*\b", question)}
        c_norm = {stem(w) for w in normalize(cand).split()} | c_nums
        gp, cp = _polarity(gold), _polarity(cand)
        # key facts: numbers count twice, names once, a yes/no answer once
        weights = [(k in c_norm, 2.0) for k in g_nums] + [(k in c_norm, 1.0) for k in g_names]
        if gp is not None:
            weights.append((cp == gp, 1.0))
        total = sum(w for _, w in weights)
        key_recall = sum(w for hit, w in weights if hit) / total if total else coverage
        meaning = 0.0 if cos is None else min(max((cos - 0.25) / 0.6, 0.0), 1.0)
        s = 0.3 * meaning + 0.3 * coverage + 0.4 * key_recall
        notes = [f"key facts {key_recall:.0%}", f"coverage {coverage:.0%}"] + ([f"meaning {cos:.2f}"] if cos is not None else [])
        if g_nums and c_nums and not (g_nums & c_nums):
            s *= 0.4
            notes.append("states a different number")
        if gp is not None and cp is not None and gp != cp:
            s *= 0.4
            notes.append("opposite yes/no")
        # verbosity earns nothing: a long answer that buries the facts loses a little precision
        f1 = token_f1(cand, gold)
        if len(cand.split()) > 3 * max(8, len(gold.split())):
            s *= 0.85
            notes.append("verbose")
        score = round(1 + 4 * s, 2)
        return Verdict(score, f"{score:.2f}/5: " + ", ".join(notes) + f", token F1 {f1:.2f}")


RUBRIC = """You grade an answer to a question against a reference answer. You do not know who wrote the answer.
Score 1 to 5:
5 - correct and complete: states every key fact of the reference (numbers, names, yes/no) and contradicts nothing.
4 - correct on the main fact, with a minor omission or imprecision.
3 - partly correct: some key facts right, others missing, vague or wrong.
2 - mostly wrong or off-topic, with only a minor correct element.
1 - wrong, contradicts the reference, refuses, or is empty.
Length, style and confidence earn no points; extra detail that is not in the reference earns nothing.
First explain briefly, then give the score. Reply with JSON only: {"reason": "<one or two sentences>", "score": <1-5>}"""

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"reason": {"type": "string"}, "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
    "required": ["reason", "score"],
    "additionalProperties": False,
}


def judge_messages(question: str, golden: str, candidate: str) -> list[dict]:
    return [
        {"role": "system", "content": RUBRIC},
        {"role": "user", "content": f"Question: {question}\nReference answer: {golden}\nAnswer to grade: {candidate or '(empty)'}"},
    ]


def parse_verdict(data, text: str) -> Verdict:
    if isinstance(data, dict):
        score = data.get("score")
        if isinstance(score, str) and score.strip().isdigit():
            score = int(score.strip())
        if isinstance(score, (int, float)) and not isinstance(score, bool) and 1 <= score <= 5 and float(score).is_integer():
            return Verdict(float(score), str(data.get("reason", "")).strip()[:500])
    return Verdict(None, "", error=f"unparseable judge reply: {text[:120]!r}")


class LLMJudge:
    def __init__(self, provider, cached):
        self.provider = provider
        self.cached = cached
        self.name = f"LLM judge {provider.spec.provider}/{provider.model}"
        self.short = f"{provider.spec.provider}/{provider.model}"

    def score_many(self, items: list[tuple[str, str, str]]) -> list[Verdict]:
        """items: (question, golden, candidate). One batch through the provider's ``complete_many``: concurrent
        within the judge's concurrency and rate limits (batched on the model for a local judge), cached, parsed."""
        from opensem.llm import Call

        calls = [Call(judge_messages(q, g, c), schema=JUDGE_SCHEMA, temperature=0.0) for q, g, c in items]
        stop = self.cached.complete_many(calls)
        return [parse_verdict(c.reply.data, c.reply.text) if c.reply is not None
                else Verdict(None, "", error=c.error or f"not graded: {stop}") for c in calls]

    def unreachable(self) -> Optional[str]:
        """Why the judge cannot be reached (after its retries), or None when it answers."""
        from opensem.llm import LLMError

        try:
            self.cached.complete(judge_messages("What is 2 + 2?", "4.", "4"), schema=JUDGE_SCHEMA, temperature=0.0)
        except LLMError as e:
            return str(e) if e.unreachable else None
        return None


def scorer_class(provider: str):
    """The registered (or ``module:Class``) scorer that ``judge.provider`` names, or None when it names a provider."""
    return SCORERS.get(provider) if provider in SCORERS else None


def make_judge(spec, ws) -> Scorer:
    """The configured judge: a scorer by name, or an LLM judge through the configured provider. A scorer class
    with ``from_config(spec, ws)`` is built by it, any other with no arguments."""
    cls = scorer_class(spec.provider)
    if cls is not None:
        return cls.from_config(spec, ws) if hasattr(cls, "from_config") else (cls() if isinstance(cls, type) else cls)
    from opensem.llm import CachedProvider, get_provider

    provider = get_provider(spec, models_dir=ws.base_models_dir)
    return LLMJudge(provider, CachedProvider(provider, ws.state_dir / "cache" / "judge"))


def reachable_judge(ws, ecfg, console) -> Scorer:
    """The configured judge, checked before any grading: an unreachable LLM judge is the offline scorer instead
    (``fallback_to_offline``) or a one-line error."""
    from rich.markup import escape

    from opensem.errors import OpenSEMError

    judge = make_judge(ecfg.judge, ws)
    if not isinstance(judge, LLMJudge) or ecfg.judge.in_process():
        return judge
    why = judge.unreachable()
    if why:
        if ecfg.judge.fallback_to_offline:
            console.print(f"[yellow]judge {escape(judge.short)} is unreachable ({escape(why[:80])}); using the offline reference scorer[/]")
            return ReferenceScorer()
        raise OpenSEMError(f"configs/eval_config.yaml: judge {judge.short} is unreachable: {why[:120]}")
    return judge
