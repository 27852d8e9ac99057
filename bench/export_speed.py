"""Export times, file sizes and decoding speed: the GGUF in llama.cpp vs the merged model in transformers (CPU).

A tiny adapter is trained on the embedded SmolLM2-135M (a few steps on example sentences), exported through
`opensem export` (merged, f16, q8_0, q4_k_m; round-trip check on), then the same golden questions of the example
are answered greedily, one at a time, by each side in its own process, alternating, three rounds:

    transformers   the merged export, fp32 (what the judge runs on a CPU)
    llama.cpp      each GGUF, with the chat template stored in it

    python bench/export_speed.py [--rounds 3] [--questions 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
MAX_NEW = 64


def setup(ws: Path, questions: int) -> Path:
    import yaml

    from opensem.models import resolve_base_model
    from opensem.train import run_training
    from opensem.workspace import Workspace, init_workspace

    init_workspace(ws, "product-manual")
    resolve_base_model("smollm2-135m-instruct", ws / "models/base")
    golden = json.loads((ws / "evals/golden_set.json").read_text())
    rows = [{"conversations": [{"from": "human", "value": g["question"]}, {"from": "gpt", "value": g["answer"]}]} for g in golden]
    (ws / "data/processed/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "data/processed/test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = yaml.safe_load((ws / "configs/train_config.yaml").read_text()) | {
        "max_steps": 12, "run_name": "bench", "replay": None, "save_steps": 100}
    (ws / "configs/train_config.yaml").write_text(yaml.safe_dump(cfg))
    (ws / "configs/export_config.yaml").write_text(
        f"formats: [merged, gguf]\ngguf_types: [f16, q8_0, q4_k_m]\nverify: {{questions: {questions}}}\n")
    run_training(Workspace(ws))
    return ws / "models/adapters/bench"


def transformers_side(merged: str, convs_file: str) -> dict:
    from opensem.inference import ChatModel

    convs = json.loads(Path(convs_file).read_text())
    m = ChatModel(merged, device="cpu")
    m.generate(convs[:1], max_new_tokens=8)  # warm-up
    t = time.perf_counter()
    out = m.generate(convs, max_new_tokens=MAX_NEW, batch_size=1)
    secs = time.perf_counter() - t
    return {"tokens": sum(c.completion_tokens for c in out), "seconds": secs}


def child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--child", nargs="*")
    a = ap.parse_args()
    if a.child is not None:
        kind, *rest = a.child
        if kind == "transformers":
            print(json.dumps(transformers_side(*rest)))
        else:
            from opensem import llamacpp

            got = llamacpp.answers(Path(rest[0]), json.loads(Path(rest[1]).read_text()), MAX_NEW)
            print(json.dumps({"tokens": got.completion_tokens, "seconds": got.seconds}))
        return

    from opensem.export.stage import export_run, golden_sample
    from opensem.lineage import read_json
    from opensem.workspace import Workspace

    ws = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        adapter = setup(ws, a.questions)
        w = Workspace(ws)
        t = time.time()
        out = export_run(w, adapter)
        total = time.time() - t
        files = read_json(out / "export_manifest.json")["files"]
        print(f"\nexport of the embedded model + adapter ({total:.1f} s in all, round-trip check included):")
        print(f"{'file':26} {'size MB':>8} {'export s':>9} {'identical':>10} {'agreement':>10}")
        for key, f in files.items():
            c = f.get("check") or {}
            print(f"{Path(f['path']).name:26} {f['bytes'] / 1e6:8.1f} {f['seconds']:9.1f} {c.get('exact', 0):10.0%} {c.get('agreement', 0):10.2f}")
        _, convs = golden_sample(w, a.questions)
        convs_file = ws / "convs.json"
        convs_file.write_text(json.dumps(convs))
        sides = {"transformers merged fp32": ["transformers", str(out / "merged"), str(convs_file)]}
        for t_ in ("f16", "q8_0", "q4_k_m"):
            sides[f"llama.cpp {t_}"] = ["llama.cpp", str(out / f"bench-{t_}.gguf"), str(convs_file)]
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(a.rounds):
            for name, args in (sides.items() if r % 2 == 0 else reversed(sides.items())):
                res = child(args)
                rates[name].append(res["tokens"] / res["seconds"])
        base = statistics.median(rates["transformers merged fp32"])
        print(f"\ndecoding, {a.questions} golden questions one at a time, greedy, <= {MAX_NEW} new tokens; {a.rounds} alternating rounds:")
        for name, rs in rates.items():
            med = statistics.median(rs)
            print(f"{name:26} tokens/s {', '.join(f'{x:.1f}' for x in rs)}  median {med:.1f}  ({med / base:.2f}x transformers)")
    finally:
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
