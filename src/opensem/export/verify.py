"""The round-trip check: an exported model answers a sample of golden questions greedily, and its answers must
match those of the model that was evaluated (base + adapter, as the judge ran it).

    unquantized (merged, f32/f16/bf16 GGUF, f16 LoRA GGUF): at least ``min_exact`` of the answers identical
        and a mean agreement of at least ``min_agreement_unquantized``;
    quantized (q8_0, q4_k_m, ...): a mean agreement of at least ``min_agreement_quantized``;
    both: no answer states a fact the evaluated model's answer does not: a number, a name or a yes/no of its
        own (``changed_facts``), whatever the mean agreement. "up to 150 kilograms" exported as "350 kilograms"
        fails the export.

Agreement is the offline reference scorer's 1-5 score of the exported model's answer against the evaluated
model's answer (5: every key fact and the meaning kept; identical answers score 5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from opensem.errors import OpenSEMError


@dataclass
class Check:
    target: str
    quantized: bool
    exact: float
    agreement: float
    passed: bool
    rule: str
    differing: list[dict] = field(default_factory=list)
    tokens_per_s: Optional[float] = None
    changed: list[dict] = field(default_factory=list)  # answers that changed a number, a name or a yes/no

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        facts = f", {len(self.changed)} changed a number, name or yes/no" if self.changed else ""
        return (f"round-trip {verdict}: {self.target}: {self.exact:.0%} identical answers, agreement "
                f"{self.agreement:.2f}/5{facts} ({self.rule})")


NUMBER_WORDS = set("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
                   "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
                   "million billion half quarter once twice".split())


def _numbers(text: str) -> set[str]:
    digits = {n.replace(",", "") for n in re.findall(r"\d+(?:[.,]\d+)*", text)}
    return digits | {w for w in re.findall(r"[a-z]+", text.lower()) if w in NUMBER_WORDS}


def _names(text: str) -> set[str]:
    """Capitalised words that do not open a sentence, and codes with a digit and a capital (H-40)."""
    names = set()
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n+", text):
        words = re.findall(r"[A-Za-z][\w-]*", sentence)
        names |= {w for w in words[1:] if w[0].isupper()}
    return names | set(re.findall(r"\b[A-Z]+-?\d[\w-]*", text))


def _polarity(text: str) -> Optional[str]:
    first = re.match(r"\W*(yes|no)\b", text.lower())
    return first.group(1) if first else None


def changed_facts(question: str, reference: str, candidate: str) -> list[str]:
    """What ``candidate`` states that ``reference`` (the evaluated model's answer) and the question do not: numbers,
    names, and a yes/no turned round. Leaving a fact out is not a change (the agreement score weighs that)."""
    known = reference + " " + question
    words = set(re.findall(r"[\w-]+", known.lower()))
    out = [f"number {n}" for n in sorted(_numbers(candidate) - _numbers(known))]
    out += [f"name {n}" for n in sorted(_names(candidate)) if n.lower() not in words]
    a, b = _polarity(reference), _polarity(candidate)
    if a and b and a != b:
        out.append(f"{a} -> {b}")
    return out


def compare(target: str, questions: list[str], reference: list[str], candidate: list[str], quantized: bool, cfg,
            tokens_per_s: Optional[float] = None) -> Check:
    from opensem.judge.scorers import ReferenceScorer

    exact = sum(a == b for a, b in zip(reference, candidate)) / len(reference)
    verdicts = ReferenceScorer().score_many(list(zip(questions, reference, candidate)))
    scores = [5.0 if a == b else v.score for a, b, v in zip(reference, candidate, verdicts)]
    agreement = sum(scores) / len(scores)
    if quantized:
        rule = f"quantized: agreement >= {cfg.min_agreement_quantized}"
        ok = agreement >= cfg.min_agreement_quantized
    else:
        rule = f"unquantized: >= {cfg.min_exact:.0%} identical and agreement >= {cfg.min_agreement_unquantized}"
        ok = exact >= cfg.min_exact and agreement >= cfg.min_agreement_unquantized
    differing = []
    for q, r, c, s in zip(questions, reference, candidate, scores):
        if r != c:
            facts = changed_facts(q, r, c)
            differing.append({"question": q, "evaluated": r, "exported": c, "agreement": s} | ({"changed": facts} if facts else {}))
    differing.sort(key=lambda d: not d.get("changed"))  # a changed fact first, in the manifest and in the error
    changed = [d for d in differing if d.get("changed")]
    rule += ", no number, name or yes/no changed"
    return Check(target, quantized, round(exact, 4), round(agreement, 3), ok and not changed, rule, differing, tokens_per_s, changed)


def passed(entry: dict) -> bool:
    """An exported file (its export manifest entry) whose check passed, or that was exported without one."""
    return not entry.get("check") or bool(entry["check"].get("passed"))


def fail(check: Check) -> OpenSEMError:
    """The export's error: the rule it broke and the first differing answers."""
    shown = "; ".join(f"{d['question']!r}: evaluated {d['evaluated'][:60]!r} vs exported {d['exported'][:60]!r}"
                      + (f" ({', '.join(d['changed'])})" if d.get("changed") else "") for d in check.differing[:3])
    return OpenSEMError(f"{check.line()}: {shown} (all answers in the export manifest; --no-verify skips the check)")
