"""Stages 2 and 4, the Judge: golden set -> promptfoo + 1-5 judge -> Baseline vs Fine-Tuned report."""

from opensem.judge.stage import run_calibration, run_judge

__all__ = ["run_judge", "run_calibration"]
