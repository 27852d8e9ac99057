"""The local teacher's throughput on the forge's own work: the same sentence-strategy requests of examples/island-ferry
(system prompt, two few-shot turns, one source sentence; the default wordings each: 1 greedy, the rest sampled) answered by the
embedded SmolLM2-135M, before and after, alternating in one process:

    before   every prompt computed in full, 16 rows decoded together; every row decodes until its end-of-turn
             token or max_tokens
    after    the batch's shared prompt prefix computed once (its KV cache repeated for the batch); 64 rows decoded
             together (sampling from one generator per 16 rows, as before), and the prompts' forward pass reused
             by the same sentences' other wordings; each row stops at its question mark (the forge keeps a
             question up to its "?" anyway) and leaves the batch, so the batch shrinks as rows finish

Prints calls/s per round and the median, and how many cleaned questions are identical (same seeds).

    python bench/local_teacher.py [--calls 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import scratch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def requests(n: int):
    from opensem.forge.config import ForgeConfig
    from opensem.forge.documents import chunk_document, read_documents
    from opensem.forge.stage import plan_requests

    cfg = ForgeConfig()
    docs, _ = read_documents(REPO / "examples/island-ferry/data/raw")
    chunks = [c for d in docs for c in chunk_document(d, cfg.chunking.chunk_tokens, cfg.chunking.overlap_tokens)]
    return plan_requests(chunks, cfg)[:n]


def run(provider, reqs, after: bool):
    from opensem.forge.synthesis import clean_question
    from opensem.llm.base import Call

    provider.chat_model.reference_decoding = not after
    provider.decode_batch_size = 64 if after else 16
    calls = [Call(r.messages, None, r.temperature, r.max_tokens, r.variant, stop_after=("?",) if after else ()) for r in reqs]
    t = time.perf_counter()
    provider.complete_many(calls)
    secs = time.perf_counter() - t
    return secs, [clean_question(c.reply.text) if c.reply else None for c in calls], sum(c.reply.output_tokens for c in calls if c.reply)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    scratch.use("bench-teacher-")
    from opensem.config import LLMSpec
    from opensem.llm.local_models import LocalProvider

    reqs = requests(a.calls)
    models = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    provider = LocalProvider(LLMSpec(provider="local", model="smollm2-135m-instruct"), models)
    run(provider, reqs[:8], True)  # warm-up
    rates: dict[str, list[float]] = {"before": [], "after": []}
    outputs: dict[str, list] = {}
    for r in range(a.rounds):
        for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
            secs, qs, toks = run(provider, reqs, side == "after")
            rates[side].append(len(reqs) / secs)
            outputs[side] = qs
            print(f"round {r + 1} {side:6}: {len(reqs)} calls in {secs:6.1f} s = {len(reqs) / secs:5.2f} calls/s ({toks} tokens decoded)")
    same = sum(x == y for x, y in zip(outputs["before"], outputs["after"]))
    b, f = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"\nmedian calls/s: before {b:.2f}, after {f:.2f}: {f / b:.2f}x; identical questions {same}/{len(reqs)}")


if __name__ == "__main__":
    main()
