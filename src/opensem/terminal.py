"""What reaches the user's terminal: rich's Console, with every control character of the data made visible.

File names, golden ids, teacher replies and config values are data: a name holding ``ESC c`` (reset) or
``ESC[2J`` (clear) must print as text, never act on the terminal. Rich escapes its markup but passes control
characters through, so this Console writes C0 (but tab and newline), DEL and C1 characters as ``\\xNN`` in
every piece of text it renders; its own styling and cursor moves are untouched.
"""

from __future__ import annotations

import re

from rich.console import Console as _RichConsole
from rich.segment import Segment

CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """``text`` with its control characters written as ``\\xNN``."""
    return CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Console(_RichConsole):
    def _render_buffer(self, buffer) -> str:
        return super()._render_buffer(Segment(visible(text), style, control) if control is None and text else Segment(text, style, control)
                                      for text, style, control in buffer)
