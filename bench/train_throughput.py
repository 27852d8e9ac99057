"""Training throughput on the CPU: OpenSEM's hf engine against a plain TRL SFTTrainer script with its defaults.

Same model (the embedded SmolLM2-135M), same data (chat pairs built from the example documents), same
hyperparameters (LoRA r/alpha/targets, learning rate, batch size, steps). Each side runs in its own
process; the figures are real (non-padding) tokens per second and peak resident memory. Three rounds,
alternating which side goes first; the claim is the median of the three per-round ratios.

Then a profile of one more run per side, where a step's time goes:
- forward, backward and optimizer seconds per step (the first step, a warm-up, left out);
- the share of the profiled ops' time spent on the LM head and the loss (every op on a vocabulary-sized
  tensor: the head's matmuls, softmax, cross-entropy, and plain TRL's token-accuracy/entropy metrics), in
  attention (scaled-dot-product), and the share of positions that are padding;
- real tokens/s against the arithmetic bound of this CPU: its fp32 and bf16 matmul peak, measured in the same run,
  over the least work a LoRA step needs per real token (forward and input-gradient matmuls of every linear
  layer, 4 x their weights, plus the LM head at answer positions only; no recompute, no padding).

    python bench/train_throughput.py [--steps 12] [--batch 16] [--rounds 3] [--no-profile] [--opensem-set KEY=VALUE ...]

OpenSEM runs on its defaults (sequence_len 256: no example here is cut; on a CPU its profile keeps every activation
when the longest batch's fit in half the memory). ``--opensem-set gradient_checkpointing=0.5`` (a train_config key)
measures another choice against the same plain TRL.
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
from typing import Optional

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


class StepTimer:
    """Seconds of forward (compute_loss), backward and optimizer step, per training step, for any HF Trainer;
    with ``profile`` a torch profile of steps 2-3 (record_shapes) as well. Cheap: three wrappers and a callback."""

    def __init__(self, trainer, profile: bool = False):
        from transformers import TrainerCallback

        self.steps: list[dict] = []
        self.positions = self.real = 0
        self.prof = None
        timer = self
        compute_loss, backward = trainer.compute_loss, trainer.accelerator.backward

        def timed_loss(model, inputs, *a, **k):
            mask = inputs.get("attention_mask")
            if mask is not None and model.training:
                timer.positions += mask.numel()
                timer.real += int(mask.sum())
            t = time.perf_counter()
            out = compute_loss(model, inputs, *a, **k)
            timer._add("forward", time.perf_counter() - t)
            return out

        def timed_backward(*a, **k):
            t = time.perf_counter()
            backward(*a, **k)
            timer._add("backward", time.perf_counter() - t)

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.steps.append({"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "t0": time.perf_counter()})
                if profile and state.global_step == 1:
                    from torch.profiler import ProfilerActivity
                    from torch.profiler import profile as torch_profile

                    timer.prof = torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                    timer.prof.__enter__()

            def on_pre_optimizer_step(self, args, state, control, **kw):
                timer.t_opt = time.perf_counter()

            def on_optimizer_step(self, args, state, control, **kw):
                timer._add("optimizer", time.perf_counter() - timer.t_opt)

            def on_step_end(self, args, state, control, **kw):
                timer.steps[-1]["total"] = time.perf_counter() - timer.steps[-1].pop("t0")
                if timer.prof is not None and state.global_step == 3:
                    timer.prof.__exit__(None, None, None)
                    timer.shares = op_shares(timer.prof, len(trainer.processing_class))
                    timer.prof = None

        trainer.compute_loss, trainer.accelerator.backward = timed_loss, timed_backward
        trainer.add_callback(Callback())
        self.shares: Optional[dict] = None

    def _add(self, what: str, seconds: float) -> None:
        if self.steps:
            self.steps[-1][what] += seconds

    def summary(self) -> dict:
        timed = [s for s in self.steps[1:] if "total" in s] or self.steps
        mean = lambda k: round(statistics.mean(s.get(k, 0.0) for s in timed), 3)  # noqa: E731
        return {"step_s": mean("total"), "forward_s": mean("forward"), "backward_s": mean("backward"),
                "optimizer_s": mean("optimizer"), "padding_share": round(1 - self.real / self.positions, 3) if self.positions else None,
                **({"shares": self.shares} if self.shares else {})}


def op_shares(prof, vocab: int) -> dict:
    """Shares of the profiled ops' own time: on vocabulary-sized tensors (an operand whose last dimension is at
    least a quarter of the vocabulary: the LM head, softmax, loss, metrics), in scaled-dot-product attention, in
    matmuls overall."""
    total = head = attn = mm = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        t = e.self_cpu_time_total
        total += t
        if "scaled_dot_product" in e.key:
            attn += t
        elif any(isinstance(shape, list) and shape and shape[-1] >= vocab // 4 for shape in (e.input_shapes or [])):
            head += t  # the head's matmul (whole, or in vocabulary chunks), softmax, loss, metrics over the vocabulary
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            mm += t
    return {"lm_head_and_loss": round(head / total, 3), "attention": round(attn / total, 3), "matmul": round(mm / total, 3)}


def matmul_peak(dtype_name: str, seconds: float = 2.0, via_onednn: bool = False) -> float:
    """GFLOP/s of a square matmul in this dtype on this CPU (threads as torch sets them). Sized to take about
    ``seconds``: bf16 without native support runs hundreds of times slower than fp32. ``via_onednn``: fp32 through
    oneDNN as OpenSEM's linear layers compute where that is exact and faster (opensem/onednn.py)."""
    import contextlib

    import torch

    if via_onednn:
        from opensem import onednn

        with onednn.on() if onednn.available() else contextlib.nullcontext():
            return matmul_peak(dtype_name, seconds) if onednn.available() else 0.0
    dtype = getattr(torch, dtype_name)
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time.perf_counter()
        a @ b
        one = time.perf_counter() - t
        if one > 0.05 or n >= 2048:
            break
        n *= 2
    reps = max(1, int(seconds / max(one, 1e-6)))
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def flops_per_real_token(model_dir: str, lora_r: int, answer_share: float) -> float:
    """The least matmul work of one real token in a LoRA step: forward and input-gradient of every linear layer
    (4 x weights), LoRA's own matmuls (forward, both gradients), the LM head at answer positions only."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, inter, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    linear = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(lora_r * (i + o) for i, o in shapes)
    return 4 * linear + 6 * lora + 4 * vocab * h * answer_share


def run_opensem(model_dir: str, data: Path, steps: int, batch: int, out: Path, profile: bool = False,
                sets: tuple = ()) -> dict:
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
               logging_steps=1, run_name="bench", test_datasets=[], replay=None)
    for kv in sets:
        key, _, value = kv.partition("=")
        cfg[key] = yaml.safe_load(value)
    cfg["datasets"][0]["field_messages"] = "messages"
    (ws / "configs/train_config.yaml").write_text(yaml.safe_dump(cfg))
    import opensem.train.recipe as recipe
    from opensem.train import run_training

    timers = []
    train_step = recipe.train

    def instrumented(run, trainer, data_):
        timers.append(StepTimer(trainer, profile))
        return train_step(run, trainer, data_)

    recipe.train = instrumented
    run_dir = run_training(Workspace(ws))
    m = json.loads((run_dir / "manifest.json").read_text())
    if m["data"]["train"].get("truncated"):
        raise SystemExit(f"{m['data']['train']['truncated']} examples cut at sequence_len: not the data plain TRL trains on")
    p = m["profile"]
    return {"tokens_per_s": m["tokens_per_s"], "real_tokens": m["real_tokens"], "seconds": m["wall_time_s"],
            "final_loss": m["final_train_loss"], "profile": f"{p['precision']}, checkpointed layers {p['checkpoint_layers']:g}",
            "steps": timers[0].summary()}


def run_plain_trl(model_dir: str, data: Path, steps: int, batch: int, out: Path, profile: bool = False) -> dict:
    """What a user writes from the TRL docs: SFTTrainer + LoraConfig, everything else default, except the precision:
    the same as OpenSEM's profile picks (on a CPU fp32, on a GPU bf16 where it has it). (transformers 5 loads the
    embedded model's bf16 weights by default; on a CPU without native bf16 every bf16 matmul is emulated, hundreds of
    times slower than fp32, and the ratio would measure that, not the training step.)"""
    sys.path.insert(0, str(REPO / "src"))
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from opensem.kernel.config import TrainConfig
    from opensem.kernel.hardware import detect_hardware, make_profile

    bf16 = make_profile(TrainConfig(), detect_hardware()).precision == "bf16"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    ds = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(output_dir=str(out / "plain"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=bf16)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features):
        batch_ = collate(features)
        counted["tokens"] += int(batch_["attention_mask"].sum()) if "attention_mask" in batch_ else int(batch_["input_ids"].numel())
        return batch_

    trainer.data_collator = counting
    timer = StepTimer(trainer, profile)
    t = time.time()
    trainer.train()
    wall = time.time() - t
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"tokens_per_s": round(counted["tokens"] / wall, 1), "real_tokens": counted["tokens"], "seconds": round(wall, 1),
            "final_loss": losses[-1] if losses else None, "steps": timer.summary(),
            "profile": f"bf16={args.bf16}, checkpointing={getattr(args, 'activation_checkpointing', getattr(args, 'gradient_checkpointing', None))}"}


def child(which: str, model_dir: str, data: str, steps: int, batch: int, out: str, profile: bool, sets: tuple) -> None:
    if which == "opensem":
        res = run_opensem(model_dir, Path(data), steps, batch, Path(out), profile, sets)
    else:
        res = run_plain_trl(model_dir, Path(data), steps, batch, Path(out), profile)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(res), flush=True)


def answer_share(model_dir: str, data: Path) -> float:
    """Answer tokens (the trained ones) per real token, as OpenSEM tokenises the bench data."""
    from transformers import AutoTokenizer

    from opensem.kernel.data import load_conversations, tokenize_conversations

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize_conversations(tok, load_conversations(data, "messages"), 1024).rows
    return sum(sum(r["assistant_masks"]) for r in rows) / sum(len(r["input_ids"]) for r in rows)


def spawn(which: str, model_dir: str, data: Path, tmp: Path, steps: int, batch: int, profile: bool, sets=()) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--steps", str(steps), "--batch", str(batch),
                           *[x for kv in sets for x in ("--opensem-set", kv)], "--child",
                           "opensem" if which == "opensem" else "plain", model_dir, str(data), str(tmp), "profile" if profile else "x"],
                          capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "disabled"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(proc.stderr[-3000:])
        raise SystemExit(f"{which} failed")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true", help="leave out the profiled run and the matmul peaks")
    ap.add_argument("--opensem-set", action="append", metavar="KEY=VALUE", help="a train_config key for OpenSEM's side")
    ap.add_argument("--child", nargs=5)
    a = ap.parse_args()
    if a.child:
        which, model_dir, data, out, prof = a.child
        child(which, model_dir, data, a.steps, a.batch, out, prof == "profile", tuple(a.opensem_set or ()))
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
            results[which] = spawn(which, base.path, data, tmp, a.steps, a.batch, False, a.opensem_set or ())
        p, o = results["plain-trl"], results["opensem"]
        rounds.append((p, o))
        print(f"round {r + 1}: tokens/s plain TRL {p['tokens_per_s']:7.1f}, opensem {o['tokens_per_s']:7.1f} "
              f"({o['tokens_per_s'] / p['tokens_per_s']:.2f}x); peak RSS MB plain {p['peak_rss_mb']:7.1f}, opensem "
              f"{o['peak_rss_mb']:7.1f} ({o['peak_rss_mb'] / p['peak_rss_mb']:.2f}x); final loss plain "
              f"{p['final_loss']:.3f}, opensem {o['final_loss']:.3f}", flush=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    speed = med([o["tokens_per_s"] / p["tokens_per_s"] for p, o in rounds])
    mem = med([o["peak_rss_mb"] / p["peak_rss_mb"] for p, o in rounds])
    print()
    print(f"steps {a.steps}, micro batch {a.batch}, same model/data/LoRA/lr, CPU ({os.cpu_count()} cores), {a.rounds} alternating rounds")
    print(f"plain TRL: {rounds[0][0]['profile']}; opensem: {rounds[0][1]['profile']}")
    print(f"median tokens/s  plain TRL {med([p['tokens_per_s'] for p, _ in rounds]):7.1f}   opensem hf engine "
          f"{med([o['tokens_per_s'] for _, o in rounds]):7.1f}   median ratio {speed:.2f}x (target >= 2.0x)")
    print(f"median peak RSS  plain TRL {med([p['peak_rss_mb'] for p, _ in rounds]):7.1f}   opensem hf engine "
          f"{med([o['peak_rss_mb'] for _, o in rounds]):7.1f}   median ratio {mem:.2f}x (target <= 1.0x)")
    if a.no_profile:
        return
    print("\nprofile (step seconds: median over the rounds, first step left out; shares: one more run per side, steps 2-3 "
          "under torch.profiler)", flush=True)
    prof = {w: spawn(w, base.path, data, tmp, 4, a.batch, True, a.opensem_set or ())["steps"] for w in ("plain-trl", "opensem")}
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    peaks["float32 oneDNN"] = matmul_peak("float32", via_onednn=True)
    per_token = flops_per_real_token(base.path, 16, answer_share(base.path, data))
    side = {"plain-trl": [p for p, _ in rounds], "opensem": [o for _, o in rounds]}
    rows = [("step, s", lambda w: f"{med([r['steps']['step_s'] for r in side[w]]):.2f}"),
            ("  forward, s", lambda w: f"{med([r['steps']['forward_s'] for r in side[w]]):.2f}"),
            ("  backward, s", lambda w: f"{med([r['steps']['backward_s'] for r in side[w]]):.2f}"),
            ("  optimizer, s", lambda w: f"{med([r['steps']['optimizer_s'] for r in side[w]]):.3f}"),
            ("padding, share of positions", lambda w: f"{side[w][0]['steps']['padding_share']:.1%}"),
            ("LM head + loss, share of op time", lambda w: f"{prof[w]['shares']['lm_head_and_loss']:.1%}"),
            ("attention, share of op time", lambda w: f"{prof[w]['shares']['attention']:.1%}"),
            ("matmul, share of op time", lambda w: f"{prof[w]['shares']['matmul']:.1%}"),
            ("real tokens/s", lambda w: f"{med([r['tokens_per_s'] for r in side[w]]):.1f}"),
            ("  share of the fp32 bound", lambda w: f"{med([r['tokens_per_s'] for r in side[w]]) / bound:.1%}")]
    bound = max(peaks["float32"], peaks["float32 oneDNN"]) * 1e9 / per_token
    print(f"\n| {'':34} | {'plain TRL':>10} | {'opensem':>10} |\n|{'-' * 36}|{'-' * 12}|{'-' * 12}|")
    for name, f in rows:
        print(f"| {name:34} | {f('plain-trl'):>10} | {f('opensem'):>10} |")
    dnn = f"{peaks['float32 oneDNN']:.1f} GFLOP/s" if peaks["float32 oneDNN"] else "not used here"
    print(f"\nthis CPU's matmul peak: fp32 {peaks['float32']:.1f} GFLOP/s (through oneDNN: {dnn}), bf16 {peaks['bfloat16']:.1f} GFLOP/s; the least "
          f"work per real token {per_token / 1e9:.2f} GFLOP, so the fp32 bound is {bound:.0f} real tokens/s")


if __name__ == "__main__":
    main()
