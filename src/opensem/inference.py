"""Local inference: one interface for a batch of chat conversations -> completions.

Used by the forge's local teacher, the judge's answer generation and the local judge. It applies the
model's own chat template, decodes greedily by default, batches with left padding (longest prompts
together, to waste little on padding), and stops at the model's end-of-turn token. GPU when present.

Shared prompt prefixes (the forge's sentence requests repeat one system prompt and its few-shot turns; only the
last sentence differs) are computed once per batch: the prefix's KV cache is built for one row and repeated
for the batch, each row is the prefix, its padding, then its own suffix, and the attention mask hides the
padding (position ids come from the mask, so every suffix continues at the prefix's end). Decoding is a loop of
its own, checked against transformers' generate() (``reference_decoding``): a row leaves the batch as soon as it
has stopped (its end-of-turn token, or a stop string after which its text is of no use, such as a question's
"?"), instead of being computed until the slowest row ends.

The prompts' forward pass of the last batch is kept: the same prompts asked again at once (the forge's other
wordings of one sentence, sampled with other seeds) start decoding from it. Sampling draws from one random
generator per block of SEED_BLOCK rows (seeded with the seed plus the block's first row), so a seed gives the
same tokens at any batch size: the teacher's batches of 64 rows sample exactly what blocks of 16 would.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class PromptTooLong(ValueError):
    def __init__(self, index: int, tokens: int, max_new_tokens: int, context: int):
        self.index, self.tokens, self.max_new_tokens, self.context = index, tokens, max_new_tokens, context
        super().__init__(f"a prompt of {tokens} tokens plus {max_new_tokens} new tokens exceeds the model's context of {context} tokens")


def context_length(config) -> Optional[int]:
    """The model's context window from its config (None when it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class PromptChecker:
    """Prompt lengths against a model's context window, from its tokenizer and config alone (no weights)."""

    def __init__(self, model_path: str):
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.context_len = context_length(AutoConfig.from_pretrained(model_path))

    def tokens(self, conversation: Sequence[Message]) -> int:
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def too_long(self, conversation: Sequence[Message], max_new_tokens: int) -> Optional[str]:
        """Why the conversation does not fit, or None."""
        n = self.tokens(conversation)
        if self.context_len and n + max_new_tokens > self.context_len:
            return f"{n} tokens, plus {max_new_tokens} new tokens, exceed the model's context of {self.context_len}"
        return None


class ChatModel:
    """A causal LM (optionally with a LoRA adapter) that answers chat conversations in batches."""

    def __init__(self, model_path: str, adapter: Optional[str] = None, device: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path, self.adapter = model_path, adapter
        self.device = device or pick_device()
        dtype = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(adapter or model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
            model = model.merge_and_unload()  # same answers, faster decoding
        self.model = model.to(self.device).eval()
        if self.device == "cpu":
            from opensem import onednn

            onednn.apply(self.model)  # fp32 products through oneDNN where that is exact and faster here
        # the KV cache argument's name: `cache` in newer transformers, `past_key_values` before (the GPU set's)
        self._cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        self._lock = threading.Lock()
        eos = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                eos.add(tid)
        self.stop_ids = sorted(i for i in eos if i is not None)
        self.context_len = context_length(model.config)
        # True: transformers' own generate() on whole prompts, the reference the decoding below is checked against
        self.reference_decoding = False
        self._last_prefill = None  # (key, cache, logits) of the last batch's prompts (see _prefill)

    def prompt_tokens(self, conversation: Sequence[Message]) -> int:
        return len(self.tokenizer(self.render(conversation), add_special_tokens=False)["input_ids"])

    def render(self, conversation: Sequence[Message]) -> str:
        return self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)

    SEED_BLOCK = 16  # rows per random generator when sampling (see the module's docstring)

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 16,
        seed: int = 0,
        progress=None,
        stop_after: Sequence[str] = (),
    ) -> list[Completion]:
        """``stop_after``: strings after which a row's text is of no use (e.g. "?" for a question): the row stops
        there (its text ends with the string) and the batch ends as soon as every row has stopped."""
        import torch

        prompts = [self.render(c) for c in conversations]
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for i, ids in enumerate(encoded):  # never run past the context: callers check first, this bounds memory
            if self.context_len and len(ids) + max_new_tokens > self.context_len:
                raise PromptTooLong(i, len(ids), max_new_tokens, self.context_len)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        if temperature > 0:  # whole seed blocks per batch; generate() draws for one block at a time
            batch_size = self.SEED_BLOCK if self.reference_decoding else -(-batch_size // self.SEED_BLOCK) * self.SEED_BLOCK
        results: list[Optional[Completion]] = [None] * len(prompts)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                shared = None if self.reference_decoding else self._shared_prefix([encoded[i] for i in idx])
                if shared:
                    batch, lcp = shared
                else:
                    batch = self.tokenizer.pad(
                        {"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt"
                    ).to(self.device)
                    lcp = 0
                kwargs = self._generation_kwargs(max_new_tokens, temperature)
                width = batch["input_ids"].shape[1]
                seeds = [seed + start + k for k in range(0, len(idx), self.SEED_BLOCK)]
                if self.reference_decoding:
                    torch.manual_seed(seeds[0])
                    out = self.model.generate(**batch, **kwargs)
                    rows = [out[row, width:].tolist() for row in range(len(idx))]
                else:
                    rows = self._decode(batch, lcp, kwargs, tuple(stop_after), seeds)
                for row, i in enumerate(idx):
                    results[i] = self._completion(rows[row], len(encoded[i]))
                if progress:
                    progress(len(idx))
        return results  # type: ignore[return-value]


    def _generation_kwargs(self, max_new_tokens: int, temperature: float) -> dict:
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _completion(self, gen: list[int], prompt_tokens: int) -> Completion:
        """A row's tokens up to and including its first stop token, as text."""
        n = len(gen)
        for k, t in enumerate(gen):
            if t in self.stop_ids:
                n = k + 1
                break
        return Completion(self.tokenizer.decode(gen[:n], skip_special_tokens=True).strip(), prompt_tokens, n)

    def _decode(self, batch: dict, lcp: int, kwargs: dict, stop_after: tuple[str, ...],
                seeds: list[int]) -> list[list[int]]:
        """generate()'s decoding loop (its own logits processors; when sampling, one draw per row of each seed
        block while the block has a row running, as generate() draws for a batch of SEED_BLOCK rows, so the same
        seed gives the same tokens), except that a row which has stopped (end-of-turn token, or one of
        ``stop_after`` in its text) is no longer computed: the batch shrinks as rows finish, instead of every row
        running until the slowest one stops."""
        import torch

        model = self.model
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n, width = ids.shape
        config, _ = model._prepare_generation_config(None, **kwargs)
        processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=width, encoder_input_ids=ids,
                                                 prefix_allowed_tokens_fn=None, logits_processor=None, device=ids.device,
                                                 model_kwargs={})
        generators = [torch.Generator(device=ids.device).manual_seed(s) for s in seeds] if config.do_sample else []
        pad = self.tokenizer.pad_token_id
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache, logits = self._prefill(ids, mask, positions, lcp)
        active = torch.arange(n, device=ids.device)
        last = positions[:, -1].clone()
        seqs, gen = ids, [[] for _ in range(n)]
        done = [False] * n
        for _ in range(config.max_new_tokens):
            # the processors (temperature, top-k, top-p) work row by row: only the rows still running need them
            scores = processors(seqs[active], logits.to(dtype=torch.float32))
            step = self._next_tokens(scores, active, done, generators, n, pad)
            seqs = torch.cat([seqs, step[:, None]], dim=-1)
            for r in active.tolist():
                t = int(step[r])
                gen[r].append(t)
                if t in self.stop_ids or any(x in self.tokenizer.decode(gen[r]) for x in stop_after):
                    done[r] = True
            keep = [k for k, r in enumerate(active.tolist()) if not done[r]]
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=ids.device)
                cache.batch_select_indices(sel)
                mask = mask[sel]
                active = active[sel]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=ids.device)], dim=-1)
            last[active] += 1
            out = model(input_ids=step[active][:, None], attention_mask=mask, position_ids=last[active][:, None],
                        use_cache=True, **{self._cache_arg: cache})
            logits = out.logits[:, -1]
        return gen

    def _next_tokens(self, scores, active, done: list[bool], generators: list, n: int, pad: int):
        """One token per row: greedy, or (sampling) per seed block still running one draw per row of the block, as
        generate() makes; pad for the rows that have stopped."""
        import torch

        step = torch.full((n,), pad, dtype=torch.long, device=scores.device)
        if generators:
            probs = torch.zeros((n, scores.shape[-1]), dtype=torch.float32, device=scores.device)
            probs[:, pad] = 1.0
            probs[active] = torch.nn.functional.softmax(scores, dim=-1)
            for b, g in enumerate(generators):
                rows = slice(b * self.SEED_BLOCK, min(n, (b + 1) * self.SEED_BLOCK))
                if not all(done[rows]):
                    step[rows] = torch.multinomial(probs[rows], num_samples=1, generator=g).squeeze(1)
        else:
            step[active] = torch.argmax(scores, dim=-1)
        step[torch.tensor(done, device=scores.device)] = pad
        return step

    def _prefill(self, ids, mask, positions, lcp: int):
        """The prompts' forward pass: (cache, last-position logits). The state of the last batch is kept (its
        tensors, which decoding replaces rather than changes), so the same prompts asked again at once (the
        forge's other wordings of the same sentences, with other seeds) skip the pass."""
        key = (hashlib.sha256(ids.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes()).hexdigest(), tuple(ids.shape))
        if self._last_prefill and self._last_prefill[0] == key:
            _, kept, logits = self._last_prefill
            return _shallow_copy(kept), logits
        from transformers import DynamicCache

        cache = self._prefix_cache(ids, lcp)
        cache = DynamicCache(config=self.model.config) if cache is None else cache
        past = cache.get_seq_length()
        out = self.model(input_ids=ids[:, past:], attention_mask=mask, position_ids=positions[:, past:], use_cache=True,
                         logits_to_keep=1, **{self._cache_arg: cache})
        logits = out.logits[:, -1]
        self._last_prefill = (key, _shallow_copy(cache), logits)
        return cache, logits

    MIN_SHARED_PREFIX = 32  # tokens: below this, one more forward pass costs more than it saves

    def _shared_prefix(self, rows: list[list[int]]):
        """(batch, prefix length) for rows that share a prompt prefix of at least MIN_SHARED_PREFIX tokens: each row
        is the prefix, its padding, then the rest of its prompt; else None."""
        import torch

        if len(rows) < 2:
            return None
        n = min(len(r) for r in rows) - 1  # every row keeps at least one token to feed the model
        first = rows[0]
        lcp = 0
        while lcp < n and all(r[lcp] == first[lcp] for r in rows):
            lcp += 1
        if lcp < self.MIN_SHARED_PREFIX:
            return None
        width = max(len(r) for r in rows) - lcp
        pad = self.tokenizer.pad_token_id
        ids = [first[:lcp] + [pad] * (width - len(r) + lcp) + r[lcp:] for r in rows]
        mask = [[1] * lcp + [0] * (width - len(r) + lcp) + [1] * (len(r) - lcp) for r in rows]
        batch = {"input_ids": torch.tensor(ids, device=self.device), "attention_mask": torch.tensor(mask, device=self.device)}
        return batch, lcp

    def _prefix_cache(self, ids, lcp: int):
        """The KV cache of the batch's shared prefix, computed for one row and repeated for all; None without one."""
        if not lcp:
            return None
        out = self.model(input_ids=ids[:1, :lcp], use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is not None:
            cache.batch_repeat_interleave(ids.shape[0])
        return cache


def _shallow_copy(cache):
    """A cache whose layers hold the same tensors: updates replace a layer's tensors, so neither copy changes the other."""
    import copy

    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    return twin


_CACHE: dict[tuple, ChatModel] = {}
_CACHE_LOCK = threading.Lock()


def load_chat_model(model_path: str, adapter: Optional[str] = None) -> ChatModel:
    """Load once per process; the forge, the judge and a local judge share a loaded model."""
    key = (model_path, adapter)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = ChatModel(model_path, adapter)
        return _CACHE[key]


def answer_cache_dir(ws) -> Path:
    """One cache of model answers per workspace, shared by the judge and training's replay."""
    return ws.state_dir / "cache" / "answers"


def answer_key(model_fingerprint: str, adapter_hash: Optional[str], system: Optional[str], question: str,
               max_new_tokens: int, temperature: float) -> str:
    """Cache key of one answer: what changes it (model, adapter, system prompt, question, decoding)."""
    payload = {"model": model_fingerprint, "adapter": adapter_hash, "system": system, "question": question,
               "max_new_tokens": max_new_tokens, "temperature": temperature}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_answers(
    cache_dir: Path,
    model_path: str,
    adapter: Optional[str],
    requests: list[tuple[str, list[dict]]],  # (answer_key, conversation)
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    progress=None,
    announce: Optional[Callable[[int], None]] = None,
    keep_model: bool = True,
) -> dict[str, dict]:
    """Answers by key, {"answer", "finished"}: cached ones are read, the rest generated in batches and each
    written as it is made. ``finished``: the answer ended at the end-of-turn token within max_new_tokens.
    ``keep_model=False`` frees the model afterwards instead of keeping it loaded for the process."""
    from opensem.errors import OpenSEMError
    from opensem.lineage import atomic_write_text, read_json

    out: dict[str, dict] = {}
    todo: list[tuple[str, list[dict]]] = []
    for key, conv in requests:
        try:
            hit = read_json(cache_dir / f"{key}.json", None)
        except OpenSEMError:
            hit = None  # a torn entry from an old crash: answer again
        if hit is not None:
            out[key] = {"answer": hit["answer"], "finished": hit.get("finished", True)}
            if progress:
                progress(1)
        else:
            todo.append((key, conv))
    if not todo:
        return out
    if announce:
        announce(len(todo))
    model = load_chat_model(model_path, adapter) if keep_model else ChatModel(model_path, adapter)
    for start in range(0, len(todo), batch_size * 4):
        part = todo[start : start + batch_size * 4]
        outs = model.generate([c for _, c in part], max_new_tokens=max_new_tokens, temperature=temperature,
                              batch_size=batch_size, progress=progress)
        for (key, conv), o in zip(part, outs):
            rec = {"question": conv[-1]["content"], "answer": o.text, "finished": o.completion_tokens < max_new_tokens}
            out[key] = rec
            atomic_write_text(cache_dir / f"{key}.json", json.dumps(rec, ensure_ascii=False))
    return out
