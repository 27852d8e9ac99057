"""Ingest (.txt, .md, .pdf, recursively) and chunking by tokens along Markdown headings and paragraphs."""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from opensem.forge.config import ForgeConfig
from opensem.encoding import NotText, decode_text
from opensem.errors import NoDocuments, OpenSEMError
from opensem.lineage import file_sha256
from opensem.terminal import Console
from opensem.workspace import Workspace

SUFFIXES = {".txt", ".md", ".markdown", ".pdf"}
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
PIECE_RE = re.compile(rf"[A-Za-z]+|\d|[{_CJK}]|[^\W\d_]+|\n+|[ \t]{{2,}}|[^\w\s]+|\s")
CJK_RE = re.compile(rf"[{_CJK}]")
MAX_CHARS_PER_TOKEN = 6  # chunks are bounded by characters too: chunk_tokens x this
SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def count_tokens(text: str) -> int:
    """An estimate of a BPE tokenizer's count from the characters alone, for teachers whose tokenizer is
    not here: a common word is one token, a long or spaceless run of letters one per ~3.6 characters,
    mixed-case or random runs one per ~1.8, a digit one, a CJK character ~1.8, other scripts one per
    character, punctuation one per two. Within 16% of SmolLM2's tokenizer on English prose, Markdown,
    JSON, Python code, CJK, Cyrillic, German, base64, hex and spaceless text (tests/test_hostile.py)."""
    n = 0.0
    for m in PIECE_RE.finditer(text):
        p = m.group()
        c = p[0]
        if c.isascii() and c.isalpha():
            if p.islower() or (p[0].isupper() and p[1:].islower()):
                n += 1 if len(p) <= 8 else math.ceil(len(p) / 3.6)
            else:
                n += math.ceil(len(p) / 1.8)
        elif c.isdigit():
            n += 1
        elif CJK_RE.match(c):
            n += 1.8
        elif c.isalpha():
            n += len(p)
        elif p in (" ", "\t"):
            continue
        elif p.isspace():
            n += 1
        else:
            n += math.ceil(len(p) / 2)
    return math.ceil(n)


@dataclass
class Document:
    path: str  # relative to the input folder
    text: str
    sha: str


@dataclass
class Skipped:
    path: str
    reason: str


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    pages = [(page.extract_text() or "") for page in reader.pages]
    return "\n\n".join(p.strip() for p in pages if p.strip())


def list_inputs(input_dir: Path) -> tuple[list[tuple[str, Path]], list[Skipped]]:
    """The files under ``input_dir`` that may be read, as (path relative to it, path), and what was passed over
    with the reason: hidden files and everything under a hidden folder, links that lead out of ``input_dir`` (or
    to a folder, or nowhere), and anything that is not a regular file (a FIFO, a socket, a device). Only the
    user's documents, as they are under ``input_dir``, are ever read."""
    files: list[tuple[str, Path]] = []
    skipped: list[Skipped] = []
    if not input_dir.is_dir():
        return files, skipped
    root = input_dir.resolve()
    for top, dirs, names in os.walk(input_dir, followlinks=False):
        top_path = Path(top)
        for d in sorted(dirs):
            path = top_path / d
            rel = str(path.relative_to(input_dir))
            if path.is_symlink():
                skipped.append(Skipped(rel, "link to a folder: not followed (copy the documents into the folder)"))
            elif d.startswith("."):
                count = sum(len(f) for _, _, f in os.walk(path, followlinks=False))
                skipped.append(Skipped(rel + "/", f"hidden folder: not read ({count} file(s))"))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top_path / d).is_symlink())
        for name in sorted(names):
            path = top_path / name
            rel = str(path.relative_to(input_dir))
            if name.startswith("."):
                skipped.append(Skipped(rel, "hidden file: not read"))
                continue
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    skipped.append(Skipped(rel, "broken link or a link loop"))
                    continue
                if not target.is_relative_to(root):
                    skipped.append(Skipped(rel, "link to a file outside the input folder: not read (copy the file in if you mean it)"))
                    continue
                if any(part.startswith(".") for part in target.relative_to(root).parts):
                    skipped.append(Skipped(rel, "link to a hidden file: not read"))
                    continue
            try:
                mode = path.stat().st_mode
            except OSError as e:
                skipped.append(Skipped(rel, f"unreadable ({type(e).__name__})"))
                continue
            if not stat.S_ISREG(mode):
                kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                        else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
                skipped.append(Skipped(rel, f"not a regular file ({kind}): not read"))
                continue
            files.append((rel, path))
    files.sort()
    skipped.sort(key=lambda s: s.path)
    return files, skipped


def read_documents(input_dir: Path) -> tuple[list[Document], list[Skipped]]:
    docs: list[Document] = []
    files, skipped = list_inputs(input_dir)
    for rel, path in files:
        if path.suffix.lower() not in SUFFIXES:
            skipped.append(Skipped(rel, f"unsupported type {path.suffix or '(none)'}"))
            continue
        try:
            text = _read_pdf(path) if path.suffix.lower() == ".pdf" else decode_text(path.read_bytes())
        except NotText as e:
            skipped.append(Skipped(rel, str(e)))
            continue
        except Exception as e:  # unreadable or corrupt: report, never fatal
            skipped.append(Skipped(rel, f"unreadable ({type(e).__name__}: {str(e)[:80]})"))
            continue
        text = text.replace("\r\n", "\n").replace("\x00", "").strip()
        if not text:
            skipped.append(Skipped(rel, "empty (no text could be extracted)"))
            continue
        docs.append(Document(rel, text, sha256(text)))
    skipped.sort(key=lambda s: s.path)
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
    """A paragraph, or its sentences, or word windows, or character windows: each at most ``limit``
    estimated tokens and ``limit x MAX_CHARS_PER_TOKEN`` characters (a 2 MB line with no spaces too)."""
    max_chars = limit * MAX_CHARS_PER_TOKEN
    if count_tokens(paragraph) <= limit and len(paragraph) <= max_chars:
        return [paragraph]
    out: list[str] = []
    for sent in split_sentences(paragraph):
        if count_tokens(sent) <= limit and len(sent) <= max_chars:
            out.append(sent)
            continue
        window: list[str] = []
        used_tokens = used_chars = 0
        for word in sent.split():
            if count_tokens(word) > limit or len(word) > max_chars:
                if window:
                    out.append(" ".join(window))
                    window, used_tokens, used_chars = [], 0, 0
                start = 0
                while len(word) - start > max_chars or count_tokens(word[start : start + max_chars]) > limit:
                    cut = _longest_prefix(word[start : start + max_chars], limit)
                    out.append(word[start : start + cut])
                    start += cut
                word = word[start:]
            t = count_tokens(word)
            if window and (used_tokens + t > limit or used_chars + len(word) + 1 > max_chars):
                out.append(" ".join(window))
                window, used_tokens, used_chars = [], 0, 0
            window.append(word)
            used_tokens += t
            used_chars += len(word) + 1
        if window:
            out.append(" ".join(window))
    return [p for p in out if p]


def _longest_prefix(word: str, limit: int) -> int:
    """The longest prefix of a spaceless run within ``limit`` estimated tokens (at least one character)."""
    lo, hi = 1, len(word)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(word[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
                body = "\n\n".join(current + [piece])
                used = count_tokens(body) + count_tokens(carry)
                if current and (used > budget or len(body) + len(carry) > budget * MAX_CHARS_PER_TOKEN):
                    emit()
                    current = []
                current.append(piece)
        if current:
            emit()
    return chunks


# -- what the forge, continued pre-training and retrieval read: data/raw, read and chunked once -------------
def ingest(ws: Workspace, cfg: ForgeConfig, console: Console) -> tuple[list, list, list[Chunk]]:
    docs, skipped = read_documents(ws.path(cfg.input_dir))
    for s in skipped:
        console.print(f"[yellow]skipped[/] {escape(cfg.input_dir)}/{escape(s.path)}: {escape(s.reason)}")
    if not docs:
        raise NoDocuments(
            f"{cfg.input_dir}: no readable .txt, .md or .pdf documents: put your documents there "
            f"(or run `opensem init --example product-manual` for the example)"
        )
    chunks = [c for d in docs for c in chunk_document(d, cfg.chunking.chunk_tokens, cfg.chunking.overlap_tokens)]
    return docs, skipped, chunks


def raw_inputs(ws: Workspace, cfg: ForgeConfig) -> list:
    files, skipped = list_inputs(ws.path(cfg.input_dir))
    return sorted((rel, file_sha256(p)) for rel, p in files) + [(s.path, "skipped: " + s.reason) for s in skipped]
