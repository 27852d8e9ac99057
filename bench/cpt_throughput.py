"""Continued pre-training throughput next to instruction tuning, on this machine, in one run.

Each side is OpenSEM's own run with its shipped defaults (configs/cpt_config.yaml, configs/train_config.yaml)
and a fixed number of optimizer steps, in its own process, on the embedded SmolLM2-135M:

    sft             instruction tuning on chat pairs built from the example documents (answer-only loss)
    cpt             continued pre-training on the example documents (packed sequences, loss on every token)
    cpt+embeddings  the same with lora_modules_to_save: [embed_tokens, lm_head] (Unsloth's CPT recipe)

The figures are real (non-padding) tokens per second as the runs record them, and peak resident memory.

    python bench/cpt_throughput.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import scratch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "src"))


def run_side(which: str, model_dir: str, steps: int, data: str) -> dict:
    import yaml

    from opensem.workspace import init_workspace

    ws = Path(tempfile.mkdtemp(prefix="bench-cpt-"))
    init_workspace(ws, example="product-manual")
    (ws / "models/base/smollm2-135m-instruct").symlink_to(model_dir)

    def update(section: str, **values) -> None:
        path = ws / "configs" / f"{section}_config.yaml"
        cfg = yaml.safe_load(path.read_text()) | values
        path.write_text(yaml.safe_dump(cfg))

    from opensem.workspace import Workspace

    if which == "sft":
        shutil.copyfile(data, ws / "data/processed/train.jsonl")
        update("train", max_steps=steps, replay=None, test_datasets=[], save_steps=10_000, run_name="bench")
        cfg = yaml.safe_load((ws / "configs/train_config.yaml").read_text())
        cfg["datasets"][0]["field_messages"] = "messages"
        (ws / "configs/train_config.yaml").write_text(yaml.safe_dump(cfg))
        from opensem.train import run_training

        run_dir = run_training(Workspace(ws))
    else:
        extra = {"lora_modules_to_save": ["embed_tokens", "lm_head"]} if which == "cpt+embeddings" else {}
        update("cpt", max_steps=steps, eval_share=0.0, save_steps=10_000, run_name="bench", **extra)
        from opensem.cpt import run_cpt

        run_dir = run_cpt(Workspace(ws))
    m = json.loads((run_dir / "manifest.json").read_text())
    return {"tokens_per_s": m["tokens_per_s"], "real_tokens": m["real_tokens"], "seconds": m["wall_time_s"],
            "steps": m["steps"], "final_loss": m["final_train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        which, model_dir, data = a.child
        res = run_side(which, model_dir, a.steps, data)
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print("RESULT " + json.dumps(res), flush=True)
        return
    scratch.use("bench-cpt-")
    from train_throughput import build_data

    from opensem.models import resolve_base_model

    base = resolve_base_model("smollm2-135m-instruct", REPO / "models/base")
    data = Path(tempfile.mkdtemp(prefix="bench-cpt-data-")) / "train.jsonl"
    build_data(data)
    results = {}
    for which in ("sft", "cpt", "cpt+embeddings"):
        r = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", which, base.path, str(data)],
                           capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(r.stderr[-3000:])
            raise SystemExit(f"{which} failed")
        results[which] = json.loads(line[0][7:])
        print(f"{which:15s} {results[which]}")
    s = results["sft"]
    print()
    print(f"{a.steps} optimizer steps each, shipped defaults, CPU ({os.cpu_count()} cores)")
    for which in ("cpt", "cpt+embeddings"):
        c = results[which]
        print(f"tokens/s  sft {s['tokens_per_s']:8.1f}   {which:15s} {c['tokens_per_s']:8.1f}   ratio {c['tokens_per_s'] / s['tokens_per_s']:.2f}x"
              f"   peak RSS {s['peak_rss_mb']:.0f} vs {c['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
