"""An Ollama Modelfile whose TEMPLATE renders exactly the prompt the tokenizer's chat template renders.

The tokenizer's (Jinja) template is rendered for a few conversations with marker contents; from them come the
text before and after each role's content and the generation prompt. The Go template written from those
pieces is checked, piece by piece, to rebuild the Jinja rendering of a multi-turn conversation; a chat template
that cannot be written that way (one that folds the system prompt into the first user turn, say) gets no
TEMPLATE line, and Ollama falls back to the template stored in the GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

S, U, A, U2 = "OPENSEMMARKSYSTEM", "OPENSEMMARKUSER", "OPENSEMMARKASSISTANT", "OPENSEMMARKSECONDUSER"


@dataclass
class ChatPieces:
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    default_system: Optional[str]  # the system prompt the template adds when a conversation has none

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """What the Go template renders (the same concatenation, in Python)."""
        out = "".join(getattr(self, m["role"])[0] + m["content"] + getattr(self, m["role"])[1] for m in messages)
        return out + (self.generation if add_generation_prompt else "")


class TemplateNotExpressible(ValueError):
    pass


def chat_pieces(tokenizer) -> ChatPieces:
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def split(text: str, marker: str) -> tuple[str, str]:
        if text.count(marker) != 1:
            raise TemplateNotExpressible(f"the template does not render a {marker} message content once")
        a, b = text.split(marker)
        return a, b

    try:
        sys_only = render([{"role": "system", "content": S}])
        with_user = render([{"role": "system", "content": S}, {"role": "user", "content": U}])
        with_asst = render([{"role": "system", "content": S}, {"role": "user", "content": U},
                            {"role": "assistant", "content": A}])
        with_gen = render([{"role": "system", "content": S}, {"role": "user", "content": U}], gen=True)
        user_only = render([{"role": "user", "content": U}])
    except Exception as e:  # templates that refuse a role or a shape
        raise TemplateNotExpressible(f"the chat template cannot render a plain system/user/assistant turn ({e})") from None
    for longer, shorter in ((with_user, sys_only), (with_asst, with_user), (with_gen, with_user)):
        if not longer.startswith(shorter):
            raise TemplateNotExpressible("a turn changes how the turns before it are rendered")
    system = split(sys_only, S)
    user = split(with_user[len(sys_only):], U)
    assistant = split(with_asst[len(with_user):], A)
    pieces = ChatPieces(system, user, assistant, with_gen[len(with_user):], None)
    if user_only != pieces.render([{"role": "user", "content": U}], False):
        lead = user_only[: len(user_only) - len(user[0] + U + user[1])]
        if not (user_only.endswith(user[0] + U + user[1]) and lead.startswith(system[0]) and lead.endswith(system[1])):
            raise TemplateNotExpressible("a conversation without a system turn is rendered in another way")
        pieces.default_system = lead[len(system[0]): len(lead) - len(system[1])]
    convo = [{"role": "system", "content": S}, {"role": "user", "content": U}, {"role": "assistant", "content": A},
             {"role": "user", "content": U2}]
    if render(convo, gen=True) != pieces.render(convo):
        raise TemplateNotExpressible("a multi-turn conversation is not the turns rendered one after another")
    return pieces


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def go_template(p: ChatPieces) -> str:
    """Ollama's TEMPLATE (Go text/template over .Messages) for these pieces."""
    branch = lambda role, pre, post: f'eq .Role "{role}" }}}}{_go_literal(pre)}{{{{ .Content }}}}{_go_literal(post)}'  # noqa: E731
    return ("{{- range .Messages }}{{ if " + branch("system", *p.system) + "{{ else if " + branch("user", *p.user)
            + "{{ else if " + branch("assistant", *p.assistant) + "{{ end }}{{ end }}" + _go_literal(p.generation))


def stop_words(p: Optional[ChatPieces], tokenizer) -> list[str]:
    """End-of-turn text and the special tokens that open a turn: generation stops at any of them."""
    cands = [tokenizer.eos_token]
    if p:
        cands.append(p.assistant[1].strip())
        cands += [t for t in tokenizer.all_special_tokens if t and t in p.user[0]]
    out: list[str] = []
    for c in cands:
        if c and c not in out:
            out.append(c)
    return out


def _quoted(text: str) -> str:
    if '"""' in text:
        raise TemplateNotExpressible('the text contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer, system: Optional[str], header: str) -> tuple[str, dict]:
    """The Modelfile text, and what it was made from (for the export manifest)."""
    lines = [f"# {line}" for line in header.splitlines()] + [f"FROM ./{gguf_name}"]
    try:
        p: Optional[ChatPieces] = chat_pieces(tokenizer)
        why = None
    except TemplateNotExpressible as e:
        p, why = None, str(e)
    if p:
        lines.append(f"TEMPLATE {_quoted(go_template(p))}")
    system = system if system is not None else (p.default_system if p else None)
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    stops = stop_words(p, tokenizer)
    lines += [f"PARAMETER stop {_quoted(s) if chr(10) in s else chr(34) + s + chr(34)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    info = {"template": "written from the tokenizer's chat template" if p else f"from the GGUF ({why})",
            "system": system, "stop": stops}
    return "\n".join(lines) + "\n", info
