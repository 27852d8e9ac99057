"""The round-trip check: an exported model answers a sample of golden questions greedily, and its answers must
match those of the model that was evaluated (base + adapter, as the judge ran it).

    unquantized (merged, f32/f16/bf16 GGUF, f16 LoRA GGUF): at least ``min_exact`` of the answers identical
        and a mean agreement of at least ``min_agreement_unquantized``;
    quantized (q8_0, q4_k_m, ...): a mean agreement of at least ``min_agreement_quantized``.

Agreement is the offline reference scorer's 1-5 score of the exported model's answer against the evaluated
model's answer (5: every key fact and the meaning kept; identical answers score 5).
"""

from __future__ import annotations

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

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"round-trip {verdict}: {self.target}: {self.exact:.0%} identical answers, agreement "
                f"{self.agreement:.2f}/5 ({self.rule})")


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
    differing = [{"question": q, "evaluated": r, "exported": c, "agreement": s}
                 for q, r, c, s in zip(questions, reference, candidate, scores) if r != c]
    return Check(target, quantized, round(exact, 4), round(agreement, 3), ok, rule, differing, tokens_per_s)


def fail(check: Check) -> OpenSEMError:
    """The export's error: the rule it broke and the first differing answers."""
    shown = "; ".join(f"{d['question']!r}: evaluated {d['evaluated'][:60]!r} vs exported {d['exported'][:60]!r}"
                      for d in check.differing[:3])
    return OpenSEMError(f"{check.line()}: {shown} (all answers in the export manifest; --no-verify skips the check)")
