"""What preference tuning costs next to instruction tuning: peak resident memory and time, in one run.

The same questions and the same fixed number of optimizer steps on the embedded SmolLM2-135M (CPU), each side in
its own process with its shipped defaults:

    sft   instruction tuning on (question, grounded answer)                 configs/train_config.yaml
    dpo   DPO on (question, grounded answer, a wrong answer), on top of an   configs/preference_config.yaml
          SFT adapter; reference = the merged SFT model with the LoRA off
    orpo  ORPO on the same pairs (no reference model)

    python bench/preference_memory.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import scratch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def data(dest: Path, n: int = 64) -> tuple[Path, Path]:
    """Pairs from the example documents: a sentence is the grounded answer, another sentence the wrong one."""
    from opensem.forge.documents import read_documents, split_sentences

    docs, _ = read_documents(REPO / "examples/product-manual/data/raw")
    sents = [s for d in docs for para in d.text.split("\n") for s in split_sentences(para) if len(s.split()) >= 6]
    sft, pairs = [], []
    for i in range(n):
        s, wrong = sents[i % len(sents)], sents[(i * 7 + 3) % len(sents)]
        words = re.findall(r"[A-Za-z][A-Za-z0-9-]+", s)
        q = f"What does the manual say about {' '.join(words[1:4])}?"
        sft.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": s}]})
        pairs.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": s}],
                      "rejected": [{"role": "assistant", "content": wrong}]})
    (dest / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (dest / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return dest / "train.jsonl", dest / "preferences.jsonl"


def run_side(which: str, model_dir: str, steps: int, folder: str) -> dict:
    import yaml

    from opensem.workspace import Workspace, init_workspace

    ws = Path(tempfile.mkdtemp(prefix=f"bench-pref-{which}-"))
    init_workspace(ws)
    (ws / "models/base/smollm2-135m-instruct").symlink_to(model_dir)
    shutil.copyfile(Path(folder) / "train.jsonl", ws / "data/processed/train.jsonl")
    shutil.copyfile(Path(folder) / "preferences.jsonl", ws / "data/processed/preferences.jsonl")

    def update(section: str, **values) -> None:
        path = ws / "configs" / f"{section}_config.yaml"
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | values))

    update("train", max_steps=steps, replay=None, test_datasets=[], save_steps=10_000, run_name="sft")
    if which == "sft":
        from opensem.train import run_training

        run_dir = run_training(Workspace(ws))
    else:
        shutil.copytree(Path(folder) / "sft", ws / "models/adapters/sft")  # the SFT adapter, made once beforehand
        m = json.loads((ws / "models/adapters/sft/manifest.json").read_text())
        m["base_model"]["path"] = str((ws / "models/base/smollm2-135m-instruct").resolve())
        (ws / "models/adapters/sft/manifest.json").write_text(json.dumps(m))
        update("preference", method=which, max_steps=steps, save_steps=10_000, run_name=which)
        from opensem.prefs import run_preference

        run_dir = run_preference(Workspace(ws), ws / "models/adapters/sft")
    m = json.loads((run_dir / "manifest.json").read_text())
    return {"seconds": m["wall_time_s"], "steps": m["steps"], "final_loss": m["final_train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        which, model_dir, folder = a.child
        res = run_side(which, model_dir, a.steps, folder)
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print("RESULT " + json.dumps(res), flush=True)
        return
    scratch.use("bench-pref-")
    from opensem.models import resolve_base_model

    base = resolve_base_model("smollm2-135m-instruct", REPO / "models/base")
    folder = Path(tempfile.mkdtemp(prefix="bench-pref-data-"))
    data(folder)
    results = {}
    for which in ("sft", "dpo", "orpo"):
        r = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", which, base.path, str(folder)],
                           capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(r.stderr[-3000:])
            raise SystemExit(f"{which} failed")
        results[which] = json.loads(line[0][7:])
        print(f"{which:5s} {results[which]}")
        if which == "sft":  # the adapter DPO and ORPO start from
            made = sorted(Path(tempfile.gettempdir()).glob("bench-pref-sft-*/models/adapters/sft"), key=lambda p: p.stat().st_mtime)[-1]
            shutil.copytree(made, folder / "sft")
    s = results["sft"]
    print()
    print(f"{a.steps} optimizer steps each, same 64 questions, shipped defaults, CPU ({os.cpu_count()} cores)")
    for which in ("dpo", "orpo"):
        r = results[which]
        print(f"peak RSS  sft {s['peak_rss_mb']:7.0f} MB   {which} {r['peak_rss_mb']:7.0f} MB   ratio {r['peak_rss_mb'] / s['peak_rss_mb']:.2f}x"
              f"   time {s['seconds']} s vs {r['seconds']} s")


if __name__ == "__main__":
    main()
