"""How long a run trains: exposures per fact -> passes -> optimizer steps -> estimated time, within a time budget.

A small model recalls a fact under a new wording after it has seen that fact many times in several wordings.
So the unit of training length is the exposure: one training wording of one fact seen once. The forge writes
each example's fact (``metadata.fact``); a run trains ``exposures_per_fact`` exposures of every fact:

    passes = exposures_per_fact / (training wordings per fact)
    steps  = ceil(passes x examples (replay included) / examples per optimizer step)

``max_steps`` overrides it; data without facts (your own JSONL) trains ``num_epochs`` (and ``min_steps``).
``time_budget_min`` caps the steps at what the estimated speed fits in the budget, and the run says what it
gave up. The speed comes from the newest finished run in the workspace on the same model and hardware, or a
figure measured on this tool's reference machine for the embedded model on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from opensem.config import EMBEDDED_MODEL
from opensem.kernel.config import TrainConfig
from opensem.lineage import read_json

# measured: the embedded model (135M), LoRA r32 on all linear layers, fp32, 2 CPU cores, ShareGPT pairs of one
# question and one sentence: 1,280 examples (80 steps of 16) in 395 s
EMBEDDED_CPU_SECONDS_PER_EXAMPLE = 0.31


@dataclass
class StepPlan:
    steps: int
    passes: float  # epochs over the training examples
    by: str  # what set the length: max_steps | exposures_per_fact | num_epochs | min_steps
    facts: int = 0
    wordings_per_fact: float = 0.0
    exposures_per_fact: Optional[float] = None  # what the steps give each fact
    seconds_per_example: Optional[float] = None
    speed_from: Optional[str] = None
    est_seconds: Optional[float] = None
    gave_up: Optional[dict] = None  # the time budget's cut: steps and exposures asked for, and given
    document_steps: int = 0  # steps the documents add to the QA pairs' (pre-instruction-tuning), in ``steps``

    def record(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        what = {"max_steps": "max_steps", "num_epochs": "num_epochs", "min_steps": "min_steps"}.get(self.by)
        head = (f"{self.facts} facts x {self.wordings_per_fact:.1f} wordings, {self.exposures_per_fact:.0f} exposures per fact: "
                if self.facts and self.exposures_per_fact is not None else "")
        docs = f", {self.document_steps} of them with the documents added" if self.document_steps else ""
        return (head + f"{self.steps} steps ({self.passes:.1f} passes" + (f", set by {what}" if what else "") + docs + ")"
                + (f", about {_minutes(self.est_seconds)}" if self.est_seconds else ""))


def plan_steps(cfg: TrainConfig, examples: int, facts: int, fact_examples: int, per_step: int,
               seconds_per_example: Optional[float] = None, speed_from: Optional[str] = None) -> StepPlan:
    """The number of optimizer steps. ``examples``: every training example (replay included); ``facts`` and
    ``fact_examples``: the distinct facts and the examples that carry one; ``per_step``: examples per optimizer step
    (micro batch x accumulation x processes)."""
    per_epoch = max(1, math.ceil(examples / per_step))
    wordings = fact_examples / facts if facts else 0.0
    if cfg.max_steps:
        steps, by = cfg.max_steps, "max_steps"
    elif cfg.exposures_per_fact and facts:
        steps, by = max(1, math.ceil(cfg.exposures_per_fact / wordings * examples / per_step)), "exposures_per_fact"
    else:
        steps, by = max(1, math.ceil(cfg.num_epochs * per_epoch)), "num_epochs"
        if cfg.min_steps and steps < cfg.min_steps:
            steps, by = cfg.min_steps, "min_steps"
    plan = StepPlan(steps, steps * per_step / examples, by, facts, wordings, seconds_per_example=seconds_per_example,
                    speed_from=speed_from)
    plan.exposures_per_fact = plan.passes * wordings if facts else None
    if seconds_per_example:
        plan.est_seconds = steps * per_step * seconds_per_example
        if cfg.time_budget_min and plan.est_seconds > cfg.time_budget_min * 60 and by != "max_steps":
            fit = max(1, int(cfg.time_budget_min * 60 / (per_step * seconds_per_example)))
            asked = (steps, plan.exposures_per_fact)
            plan.steps, plan.passes = fit, fit * per_step / examples
            plan.exposures_per_fact = plan.passes * wordings if facts else None
            plan.est_seconds = fit * per_step * seconds_per_example
            plan.gave_up = {"steps_asked": asked[0], "steps_given": fit, "exposures_asked": asked[1],
                            "exposures_given": plan.exposures_per_fact, "time_budget_min": cfg.time_budget_min}
    return plan


def gave_up_line(plan: StepPlan) -> Optional[str]:
    g = plan.gave_up
    if not g:
        return None
    exp = (f"; each fact gets about {g['exposures_given']:.0f} exposures instead of {g['exposures_asked']:.0f}"
           if g["exposures_asked"] is not None else "")
    return (f"time_budget_min {g['time_budget_min']:g}: training {g['steps_given']} of the {g['steps_asked']} steps asked for"
            f"{exp}; recall of the facts may suffer. Raise or remove time_budget_min to train them all")


def measured_speed(adapters: Path, base_model: str, device: str,
                   tokens_per_example: Optional[float] = None) -> tuple[Optional[float], Optional[str]]:
    """Seconds per training example: from a finished run under ``adapters`` that trained ``base_model`` on ``device``;
    else the reference figure for the embedded model on a CPU; else unknown. With ``tokens_per_example`` (the data
    about to be trained), the run whose examples were closest in length is taken (the newest of equals), and its time
    scaled from its own examples' length to these: a RAFT example, passages and all, is several times a plain one's,
    and a token of it costs more (longer attention, more recomputed layers), so a RAFT run is timed from an earlier
    RAFT run where there is one. Without it, the newest run."""
    runs = []
    for m_path in adapters.glob("*/manifest.json"):
        m = read_json(m_path, {})
        prof = m.get("profile") or {}
        per_step = (prof.get("micro_batch_size") or 0) * (prof.get("gradient_accumulation_steps") or 0) * (m.get("world_size") or 1)
        if (m.get("stage") != "train" or (m.get("config") or {}).get("base_model") != base_model
                or (m.get("hardware") or {}).get("device") != device or not m.get("steps") or not per_step
                or not m.get("wall_time_s")):
            continue
        seen = m["steps"] * per_step
        runs.append({"name": m_path.parent.name, "created": m.get("created", ""), "speed": m["wall_time_s"] / seen,
                     "tokens": m["real_tokens"] / seen if m.get("real_tokens") else None})
    if runs:
        newest = sorted(runs, key=lambda r: r["created"], reverse=True)
        sized = [r for r in newest if r["tokens"]] if tokens_per_example else []
        best = min(sized, key=lambda r: abs(math.log(r["tokens"] / tokens_per_example))) if sized else newest[0]
        speed, source = best["speed"], f"run {best['name']} on this machine"
        if sized:
            speed *= tokens_per_example / best["tokens"]
            source += ", scaled to these examples' length"
        return speed, source
    if base_model == EMBEDDED_MODEL and device == "cpu":
        return EMBEDDED_CPU_SECONDS_PER_EXAMPLE, "the embedded model on 2 CPU cores (reference figure)"
    return None, None


def _minutes(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"
