"""Training throughput on the CPU: OpenSEM's hf engine against a plain TRL SFTTrainer script with its defaults.

Same model (the embedded SmolLM2-135M), same data (chat pairs built from the example documents), same
hyperparameters (LoRA r/alpha/targets, learning rate, batch size, steps). Each side runs in its own
process; the figures are real (non-padding) tokens per second and peak resident memory. Three rounds,
alternating which side goes first; the claim is the median of the three per-round ratios.

    python bench/train_throughput.py [--steps 12] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import scratch

REPO = Path(__file__).resolve().parents[1]


def build_data(path: Path, n: int = 256) -> None:
    """Pairs from the example documents: a sentence as the answer, a templated question (no teacher needed)."""
    sys.path.insert(0, str(REPO / "src"))
    from opensem.forge.documents import read_documents, split_sentences

    docs, _ = read_documents(REPO / "examples/product-manual/data/raw")
    sents = [s for d in docs for para in d.text.split("\n") for s in split_sentences(para) if len(s.split()) >= 6]
    rows = []
    templates = ["What does the manual say about {}?", "Tell me about {}.", "What should I know about {}?"]
    for i in range(n):
        s = sents[i % len(sents)]
        words = re.findall(r"[A-Za-z][A-Za-z0-9-]+", s)
        topic = " ".join(words[1:4]) if len(words) > 4 else s
        rows.append({"messages": [{"role": "user", "content": templates[i % 3].format(topic)},
                                  {"role": "assistant", "content": s + (" " + sents[(i * 7) % len(sents)] if i % 2 else "")}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_opensem(model_dir: str, data: Path, steps: int, batch: int, out: Path) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    import shutil

    from opensem.workspace import Workspace, init_workspace

    ws = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    init_workspace(ws)
    (ws / "models/base").mkdir(parents=True, exist_ok=True)
    (ws / "models/base/smollm2-135m-instruct").symlink_to(model_dir)
    shutil.copyfile(data, ws / "data/processed/train.jsonl")
    (ws / "data/processed/test.jsonl").unlink(missing_ok=True)
    import yaml

    cfg = yaml.safe_load((ws / "configs/train_config.yaml").read_text())
    cfg.update(max_steps=steps, micro_batch_size=batch, lora_r=16, lora_alpha=32, learning_rate=2e-4, save_steps=10_000,
               logging_steps=1, run_name="bench", sequence_len=1024, test_datasets=[], replay=None)  # same data as TRL
    cfg["datasets"][0]["field_messages"] = "messages"
    (ws / "configs/train_config.yaml").write_text(yaml.safe_dump(cfg))
    from opensem.train import run_training

    run_dir = run_training(Workspace(ws))
    m = json.loads((run_dir / "manifest.json").read_text())
    return {"tokens_per_s": m["tokens_per_s"], "real_tokens": m["real_tokens"], "seconds": m["wall_time_s"],
            "final_loss": m["final_train_loss"], "profile": m["profile"]["precision"]}


def run_plain_trl(model_dir: str, data: Path, steps: int, batch: int, out: Path) -> dict:
    """What a user writes from the TRL docs: SFTTrainer + LoraConfig, everything else default."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(output_dir=str(out / "plain"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features):
        batch_ = collate(features)
        counted["tokens"] += int(batch_["attention_mask"].sum()) if "attention_mask" in batch_ else int(batch_["input_ids"].numel())
        return batch_

    trainer.data_collator = counting
    t = time.time()
    trainer.train()
    wall = time.time() - t
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"tokens_per_s": round(counted["tokens"] / wall, 1), "real_tokens": counted["tokens"], "seconds": round(wall, 1),
            "final_loss": losses[-1] if losses else None, "profile": f"bf16={args.bf16}, checkpointing={args.gradient_checkpointing}"}


def child(which: str, model_dir: str, data: str, steps: int, batch: int, out: str) -> None:
    fn = run_opensem if which == "opensem" else run_plain_trl
    res = fn(model_dir, Path(data), steps, batch, Path(out))
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=5)
    a = ap.parse_args()
    if a.child:
        which, model_dir, data, out, _ = a.child
        child(which, model_dir, data, a.steps, a.batch, out)
        return
    scratch.use("bench-train-")
    sys.path.insert(0, str(REPO / "src"))
    from opensem.models import resolve_base_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = resolve_base_model("smollm2-135m-instruct", REPO / "models/base")
    data = tmp / "train.jsonl"
    build_data(data)
    rounds = []
    for r in range(a.rounds):
        results = {}
        for which in (("plain-trl", "opensem") if r % 2 == 0 else ("opensem", "plain-trl")):
            proc = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--batch", str(a.batch), "--child",
                                   "opensem" if which == "opensem" else "plain", base.path, str(data), str(tmp), "x"],
                                  capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(proc.stderr[-3000:])
                raise SystemExit(f"{which} failed")
            results[which] = json.loads(line[0][7:])
        p, o = results["plain-trl"], results["opensem"]
        rounds.append((p, o))
        print(f"round {r + 1}: tokens/s plain TRL {p['tokens_per_s']:7.1f}, opensem {o['tokens_per_s']:7.1f} "
              f"({o['tokens_per_s'] / p['tokens_per_s']:.2f}x); peak RSS MB plain {p['peak_rss_mb']:7.1f}, opensem "
              f"{o['peak_rss_mb']:7.1f} ({o['peak_rss_mb'] / p['peak_rss_mb']:.2f}x)")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    speed = med([o["tokens_per_s"] / p["tokens_per_s"] for p, o in rounds])
    mem = med([o["peak_rss_mb"] / p["peak_rss_mb"] for p, o in rounds])
    print()
    print(f"steps {a.steps}, micro batch {a.batch}, same model/data/LoRA/lr, CPU ({os.cpu_count()} cores), {a.rounds} alternating rounds")
    print(f"median tokens/s  plain TRL {med([p['tokens_per_s'] for p, _ in rounds]):7.1f}   opensem hf engine "
          f"{med([o['tokens_per_s'] for _, o in rounds]):7.1f}   median ratio {speed:.2f}x (target >= 1.5x)")
    print(f"median peak RSS  plain TRL {med([p['peak_rss_mb'] for p, _ in rounds]):7.1f}   opensem hf engine "
          f"{med([o['peak_rss_mb'] for _, o in rounds]):7.1f}   median ratio {mem:.2f}x (target <= 1.0x)")


if __name__ == "__main__":
    main()
