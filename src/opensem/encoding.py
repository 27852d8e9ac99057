"""Reading the user's text files: UTF-8 (with or without a BOM) and UTF-16 with a BOM; nothing else.

Anything else, and binary content whatever the file is called, is refused with the reason, so no file is
ever read as mojibake. Configs and golden sets are refused with a one-line error; documents are skipped
with the reason counted.
"""

from __future__ import annotations

from pathlib import Path

from opensem.errors import OpenSEMError

BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
CONTROL_OK = {"\t", "\n", "\r", "\f", "\v"}


class NotText(ValueError):
    """Bytes that are not UTF-8 / UTF-16 text; the message says why in a few words."""


def decode_text(raw: bytes, documents: bool = True) -> str:
    """``documents``: also refuse binary content (NUL bytes, control characters) that happens to decode.
    Configs and golden sets are parsed as YAML/JSON, which judge their own characters."""
    encoding = next((enc for bom, enc in BOMS if raw.startswith(bom)), "utf-8")
    if documents and encoding == "utf-8" and b"\x00" in raw[:8192]:
        raise NotText("binary content (NUL bytes)")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise NotText(f"not UTF-8 or UTF-16 text (byte 0x{raw[e.start]:02x} at offset {e.start}): save it as UTF-8") from None
    if not documents:
        return text
    sample = text[:8192]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in CONTROL_OK or ch == "\x7f")
    if "\x00" in sample or (sample and controls / len(sample) > 0.01):
        raise NotText("binary content (control characters)")
    return text


def read_text(path: Path) -> str:
    """A config or golden set: its text, or a one-line error naming the file."""
    path = Path(path)
    try:
        return decode_text(path.read_bytes(), documents=False)
    except NotText as e:
        raise OpenSEMError(f"{path}: {e}") from None
    except OSError as e:
        raise OpenSEMError(f"{path}: cannot be read ({e.strerror})") from None
