"""How a teacher is asked for pairs: the prompts, their schema, and parsing of what comes back.

Two strategies:
- passage: capable teachers (hosted APIs, a 7B+ model behind an OpenAI-compatible server) read a whole
  chunk and return ``pairs_per_chunk`` question/answer pairs as JSON (schema-constrained where supported).
- sentence: weak local teachers (the embedded 135M model) get one source sentence per request and a
  few-shot prompt, and write only the question; the answer is the source sentence itself, so every kept
  pair is grounded by construction. Several sampled questions per sentence give each fact several
  wordings, which is what makes a small model learn it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from opensem.forge.documents import Chunk, split_sentences

PROMPT_VERSION = "forge-v1"

PAIRS_SCHEMA = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                "required": ["question", "answer"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["pairs"],
    "additionalProperties": False,
}

PASSAGE_SYSTEM = """You write training data for a domain expert assistant.
From the passage the user gives you, write question/answer pairs that a user of this domain would ask.
Rules:
- Each question stands alone: it names its subject, so a reader who never saw the passage understands it.
  Never write "the text", "the passage", "the document" or "according to".
- Each answer states the fact fully in one to three sentences, using only facts stated in the passage.
- Cover different facts; do not repeat a question in other words.
Reply with JSON only: {"pairs": [{"question": "...", "answer": "..."}]}"""


def passage_messages(chunk: Chunk, n: int) -> list[dict]:
    where = f"Section: {chunk.heading}\n" if chunk.heading else ""
    return [
        {"role": "system", "content": PASSAGE_SYSTEM},
        {"role": "user", "content": f"{where}Passage:\n{chunk.text}\n\nWrite {n} question/answer pairs."},
    ]


SENTENCE_SHOTS = [
    ("Halden Pumps > Specifications", "The H-40 pump runs at a maximum pressure of 12 bar.",
     "What is the maximum pressure of the H-40 pump?"),
    ("Store policies > Shipping", "Orders placed before noon ship on the same day.",
     "When do orders ship if they are placed before noon?"),
]
SENTENCE_SYSTEM = "You write one short question that the given sentence answers. Name the subject."


def sentence_messages(heading: str, sentence: str) -> list[dict]:
    msgs = [{"role": "system", "content": SENTENCE_SYSTEM}]
    for topic, sent, q in SENTENCE_SHOTS:
        msgs.append({"role": "user", "content": f"Topic: {topic}\nSentence: {sent}"})
        msgs.append({"role": "assistant", "content": q})
    msgs.append({"role": "user", "content": f"Topic: {heading or 'General'}\nSentence: {sentence}"})
    return msgs


PRONOUN_START = re.compile(r"^(it|its|they|their|this|these|that|those|he|she|his|her|there)\b", re.I)


@dataclass
class SourceSentence:
    text: str  # the answer: the sentence, with the one before it when it starts with a pronoun
    prompt_sentence: str
    fact: str = ""  # "<chunk id>:<n>": one fact, whatever wording its questions take


TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")


def source_sentences(chunk: Chunk, min_words: int = 6) -> list[SourceSentence]:
    """Factual sentences of a chunk (skipping the overlap carried from the previous chunk and table rows),
    each one fact."""
    body = chunk.text[len(chunk.overlap_text) :].strip() if chunk.overlap_text else chunk.text
    out: list[SourceSentence] = []
    prev = ""
    for para in body.split("\n\n"):
        para = "\n".join(line for line in para.split("\n") if not TABLE_ROW.match(line))  # a table row is no sentence
        for s in split_sentences(para.lstrip("-*+ ").strip()):
            if len(s.split()) >= min_words and not s.endswith(("?", ":")):
                answer = f"{prev} {s}" if PRONOUN_START.match(s) and prev else s
                out.append(SourceSentence(answer, answer, f"{chunk.id}:{len(out)}"))
            prev = s
    return out


QUESTION_START = re.compile(
    r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|does|do|did|can|could|should|will|would|has|have|may|must)\b",
    re.I,
)
NOT_STANDALONE = re.compile(r"\b(the (text|passage|document|sentence|article|context)|according to)\b", re.I)


def clean_question(text: str) -> str:
    text = text.strip().split("\n")[0].strip().strip('"').strip()
    text = re.sub(r"^(question|q)\s*[:\-]\s*", "", text, flags=re.I)
    if "?" in text:
        text = text[: text.index("?") + 1]
    return text.strip()


PAIR_TEXT_RE = re.compile(
    r"(?:^|\n)\s*(?:\*\*)?(?:question|q)\s*\d*\s*[:.)]\s*(?:\*\*)?\s*(?P<q>.+?)\s*"
    r"\n\s*(?:\*\*)?(?:answer|a)\s*\d*\s*[:.)]\s*(?:\*\*)?\s*(?P<a>.+?)(?=\n\s*\n|\n\s*(?:\*\*)?(?:question|q)\s*\d*\s*[:.)]|$)",
    re.I | re.S,
)


def pairs_from_text(text: str) -> list[dict]:
    """Question/answer pairs written as text ("Question: ... / Answer: ..."), as small local models often
    reply instead of JSON. Each question ends at its first question mark; each answer at a blank line."""
    out = []
    for m in PAIR_TEXT_RE.finditer(text):
        q, a = m.group("q").strip(), " ".join(m.group("a").split())
        if "?" in q:
            q = q[: q.index("?") + 1]
        q = " ".join(q.split())
        if q and a:
            out.append({"question": q, "answer": a})
    return out
