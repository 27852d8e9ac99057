"""Ingest (.txt, .md, .pdf, recursively) and chunking by tokens along Markdown headings and paragraphs."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = {".txt", ".md", ".markdown", ".pdf"}
TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def count_tokens(text: str) -> int:
    """Word and punctuation tokens: a tokenizer-independent count (about 0.75 BPE tokens each)."""
    return len(TOKEN_RE.findall(text))


@dataclass
class Document:
    path: str  # relative to the input folder
    text: str
    sha: str


@dataclass
class Skipped:
    path: str
    reason: str


def _decode(raw: bytes) -> str:
    for enc in ("utf-8-sig", "utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    pages = [(page.extract_text() or "") for page in reader.pages]
    return "\n\n".join(p.strip() for p in pages if p.strip())


def read_documents(input_dir: Path) -> tuple[list[Document], list[Skipped]]:
    docs: list[Document] = []
    skipped: list[Skipped] = []
    if not input_dir.is_dir():
        return docs, skipped
    for path in sorted(input_dir.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = str(path.relative_to(input_dir))
        if path.suffix.lower() not in SUFFIXES:
            skipped.append(Skipped(rel, f"unsupported type {path.suffix or '(none)'}"))
            continue
        try:
            text = _read_pdf(path) if path.suffix.lower() == ".pdf" else _decode(path.read_bytes())
        except Exception as e:  # unreadable or corrupt: report, never fatal
            skipped.append(Skipped(rel, f"unreadable ({type(e).__name__}: {str(e)[:80]})"))
            continue
        text = text.replace("\r\n", "\n").replace("\x00", "").strip()
        if not text:
            skipped.append(Skipped(rel, "empty (no text could be extracted)"))
            continue
        docs.append(Document(rel, text, sha256(text)))
    return docs, skipped


@dataclass
class Chunk:
    id: str
    doc: str
    index: int
    heading: str
    text: str
    sha: str
    tokens: int = 0
    overlap_text: str = field(default="", repr=False)


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading path, paragraphs) in order. Text before the first heading has an empty heading."""
    sections: list[tuple[str, list[str]]] = []
    stack: list[tuple[int, str]] = []
    paras: list[str] = []
    buf: list[str] = []

    def flush_para():
        if buf:
            p = " ".join(s.strip() for s in buf).strip()
            if p:
                paras.append(p)
            buf.clear()

    def heading_path() -> str:
        return " > ".join(h for _, h in stack)

    current = ""
    for line in text.split("\n"):
        m = HEADING_RE.match(line)
        if m:
            flush_para()
            if paras:
                sections.append((current, paras))
                paras = []
            level = len(m.group(1))
            stack = [(lv, h) for lv, h in stack if lv < level] + [(level, m.group(2).strip("# "))]
            current = heading_path()
        elif not line.strip():
            flush_para()
        elif line.lstrip().startswith(("- ", "* ", "+ ")) or re.match(r"^\s*\d+[.)]\s", line):
            flush_para()  # list items are paragraphs of their own
            buf.append(line.strip())
            flush_para()
        else:
            buf.append(line)
    flush_para()
    if paras:
        sections.append((current, paras))
    return sections


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENT_RE.split(text) if s.strip()]


def _pieces(paragraph: str, limit: int) -> list[str]:
    """A paragraph, or its sentences, or token windows: each at most ``limit`` tokens."""
    if count_tokens(paragraph) <= limit:
        return [paragraph]
    out: list[str] = []
    for sent in split_sentences(paragraph):
        if count_tokens(sent) <= limit:
            out.append(sent)
        else:
            words = sent.split()
            step = max(1, int(limit * 0.7))
            out += [" ".join(words[i : i + step]) for i in range(0, len(words), step)]
    return out


def _tail(text: str, n: int) -> str:
    """The last ``n`` tokens' worth of whole sentences (or words) of ``text``."""
    if n <= 0:
        return ""
    sents = split_sentences(text)
    out: list[str] = []
    for s in reversed(sents):
        if count_tokens(" ".join([s] + out)) > n:
            break
        out.insert(0, s)
    if out:
        return " ".join(out)
    words = text.split()
    tail: list[str] = []
    for w in reversed(words):
        if count_tokens(" ".join([w] + tail)) > n:
            break
        tail.insert(0, w)
    return " ".join(tail)


def chunk_document(doc: Document, chunk_tokens: int, overlap_tokens: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(doc.path).with_suffix("").as_posix()).strip("-").lower() or "doc"
    for heading, paras in _sections(doc.text):
        current: list[str] = []
        carry = ""

        def emit():
            nonlocal carry
            body = "\n\n".join(current)
            text = f"{carry} {body}".strip() if carry else body
            idx = len(chunks)
            chunks.append(
                Chunk(
                    id=f"{stem}#{idx:03d}",
                    doc=doc.path,
                    index=idx,
                    heading=heading,
                    text=text,
                    sha=sha256(heading + "\n" + text)[:16],
                    tokens=count_tokens(text),
                    overlap_text=carry,
                )
            )
            carry = _tail(body, overlap_tokens)

        budget = chunk_tokens
        for para in paras:
            for piece in _pieces(para, max(8, chunk_tokens - overlap_tokens)):
                used = count_tokens("\n\n".join(current + [piece])) + count_tokens(carry)
                if current and used > budget:
                    emit()
                    current = []
                current.append(piece)
        if current:
            emit()
    return chunks
