"""The question quality gate against hand labels: precision and recall of its rejections.

bench/data/question_labels.jsonl holds 460 questions that the embedded teacher wrote for the three examples
(one line each: the question, its answer sentence, the chunk's heading and sentences, and a hand label: good
is a real question, naming a subject of the sentence as the documents spell it, that the sentence answers at
least in part). The island-ferry labels were the design set the rules were written on; the product-manual and
sensor-link-spec labels were made afterwards and measure the gate held out.

    python bench/question_gate.py            # the table; -v lists every disagreement
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from opensem.forge.config import QualityConfig
from opensem.forge.quality import question_reason, shape_reason

LABELS = Path(__file__).parent / "data" / "question_labels.jsonl"


def main() -> None:
    rows = [json.loads(line) for line in LABELS.read_text().splitlines() if line.strip()]
    cfg = QualityConfig()
    print(f"{'corpus':18} {'set':9} {'gate':10} {'n':>4} {'bad':>4} {'rejected':>8} {'precision':>9} {'recall':>6}")
    for corpus, set_name in [(c, s) for c, s in dict.fromkeys((r["corpus"], r["set"]) for r in rows)] + [("all held-out", "held-out")]:
        part = [r for r in rows if (r["corpus"] == corpus or corpus == "all held-out") and r["set"] == set_name]
        for gate in ("before", "now"):
            c, why, misses = Counter(), Counter(), []
            for r in part:
                reason = shape_reason(r["question"], r["answer"], cfg)
                if reason is None and gate == "now":
                    reason = question_reason(r["question"], r["answer"], r["heading"], r["chunk"])
                c[(reason is not None, not r["good"])] += 1
                if reason:
                    why[reason] += 1
                if (reason is not None) != (not r["good"]):
                    misses.append((("rejected " + reason) if reason else "kept", r["question"]))
            tp, fp, fn = c[(True, True)], c[(True, False)], c[(False, True)]
            print(f"{corpus:18} {set_name:9} {gate:10} {len(part):4} {tp + fn:4} {tp + fp:8} {tp / max(1, tp + fp):9.2f} "
                  f"{tp / max(1, tp + fn):6.2f}   {dict(why.most_common())}")
            if "-v" in sys.argv and gate == "now" and corpus != "all held-out":
                for m in misses:
                    print("    ", *m)


if __name__ == "__main__":
    main()
