"""Chat data for training: ShareGPT or OpenAI-messages JSONL -> token ids with an assistant-only loss mask.

The base model's own chat template renders every conversation, exactly as inference renders prompts, and
the end-of-turn token after each answer is trained, so the tuned model learns to stop. After truncation to
``sequence_len`` an example with no trainable token left is dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opensem.errors import OpenSEMError

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
            "model": "assistant", "bot": "assistant"}


def to_messages(record: dict, field: str, where: str) -> list[dict]:
    turns = record.get(field)
    if turns is None:
        turns = record.get("messages") if field == "conversations" else record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise OpenSEMError(f"{where}: no '{field}' list of turns (set datasets[].field_messages in train_config.yaml)")
    msgs = []
    for t in turns:
        role = ROLE_MAP.get(t.get("from", t.get("role", "")))
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str):
            raise OpenSEMError(f"{where}: a turn needs from/role (human, gpt, system...) and value/content text")
        msgs.append({"role": role, "content": content})
    return msgs


def jsonl_records(path: Path):
    """(line number, record) for every non-blank line of a JSONL file; a line that is not a JSON object (not JSON,
    another JSON value, nested past Python's limit) is a one-line error naming the file and line."""
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise OpenSEMError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise OpenSEMError(f"{path}:{n}: nested too deeply to be a record: fix or remove the line") from None
            if not isinstance(rec, dict):
                raise OpenSEMError(f"{path}:{n}: expected a JSON object ({{...}}), found {type(rec).__name__}: fix or remove the line")
            yield n, rec


def load_conversations(path: Path, field: str) -> list[list[dict]]:
    if not path.exists():
        raise OpenSEMError(f"{path}: training data not found: run `opensem forge` first, or fix datasets[].path in train_config.yaml")
    return [to_messages(rec, field, f"{path}:{n}") for n, rec in jsonl_records(path)]


def load_facts(path: Path) -> list:
    """The fact each example is a wording of (``metadata.fact``, written by the forge), in file order; None for an
    example that names none."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                meta = json.loads(line).get("metadata")
                out.append(meta.get("fact") or None if isinstance(meta, dict) else None)
    return out


@dataclass
class TokenizedSet:
    rows: list[dict]  # {"input_ids": [...], "assistant_masks": [...]}
    dropped_no_target: int
    truncated: int
    longest: int = 0  # tokens of the longest example before truncation

    @property
    def tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def tokenize_conversations(tokenizer, convs: list[list[dict]], sequence_len: int, train_on_inputs: bool = False) -> TokenizedSet:
    rows, dropped, truncated, longest = [], 0, 0, 0
    for msgs in convs:
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        longest = max(longest, len(ids))
        mask = [1 if train_on_inputs else 0] * len(ids)
        # every assistant turn: the tokens between the prompt (with generation prompt) and the turn's end
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(_ids(tokenizer, msgs[:i], add_generation_prompt=True))
            end = len(_ids(tokenizer, msgs[: i + 1], add_generation_prompt=False))
            for k in range(start, min(end, len(ids))):
                mask[k] = 1
        if len(ids) > sequence_len:
            ids, mask = ids[:sequence_len], mask[:sequence_len]
            truncated += 1
        if not any(mask):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "assistant_masks": mask})
    return TokenizedSet(rows, dropped, truncated, longest)


def _ids(tokenizer, msgs, add_generation_prompt: bool) -> list[int]:
    if not msgs:
        return []
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def replay_prompts(ws, cfg) -> list[str]:
    """The general prompts of the ``replay`` setting (builtin, or a JSON list file)."""
    from importlib import resources

    if not cfg.replay or cfg.replay_ratio <= 0:
        return []
    if cfg.replay == "builtin":
        path = Path(str(resources.files("opensem") / "assets" / "train" / "replay_prompts.json"))
    else:
        path = ws.path(cfg.replay)
    from opensem.encoding import read_text

    try:
        prompts = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise OpenSEMError(f"configs/train_config.yaml: key 'replay': {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise OpenSEMError(f"configs/train_config.yaml: key 'replay': {path} must be a JSON list of prompt strings")
    return prompts


def build_replay(ws, cfg, base, n_train: int, say) -> list[list[dict]]:
    """Replay against forgetting: general prompts answered by the untouched base model, to be mixed in.

    The adapter then learns the domain while being shown what the base model already did on general
    requests. The prompts are kept apart from the judge's forgetting-check questions. Answers share the
    judge's answer cache (same key: base model, prompt, decoding); only answers that ended at the
    end-of-turn token are used.
    """
    from opensem.inference import answer_cache_dir, answer_key, cached_answers

    from opensem.inference import PromptChecker

    prompts = replay_prompts(ws, cfg)
    n = min(len(prompts), round(cfg.replay_ratio * n_train))
    if n <= 0:
        return []
    max_new = 96
    checker = PromptChecker(base.path)
    fits = [p for p in prompts if not checker.too_long([{"role": "user", "content": p}], max_new)]
    if len(fits) < len(prompts):
        say(f"replay: {len(prompts) - len(fits)} prompt(s) skipped: longer than the model's context")
    prompts = fits
    requests = [(answer_key(base.fingerprint, None, None, p, max_new, 0.0), [{"role": "user", "content": p}]) for p in prompts[:n]]
    got = cached_answers(
        answer_cache_dir(ws), base.path, None, requests, max_new, keep_model=False, batch_size=64,  # short prompts
        announce=lambda k: say(f"replay: the base model answers {k} general prompts (mixed in against forgetting)"),
    )
    return [conv + [{"role": "assistant", "content": got[k]["answer"]}]
            for k, conv in requests if got[k]["finished"] and got[k]["answer"].strip()]
